#!/usr/bin/env bash
# Simulate a multi-host run on one machine: N CPU processes with 2 devices each, gloo collectives.
#
#   launch/local_processes.sh 2 configs/demo.py:smoke /tmp/rsepm_multihost
set -euo pipefail
num="$1"; config="$2"; workdir="$3"; shift 3
port=$((20000 + RANDOM % 20000))
pids=()
for ((rank = 0; rank < num; rank++)); do
  RSEPM_DISTRIBUTED=1 JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 \
    RSEPM_COORDINATOR="localhost:$port" RSEPM_NUM_PROCESSES="$num" RSEPM_PROCESS_ID="$rank" \
    python -m rsepm_jax.main --config="$config" --workdir="$workdir" "$@" \
    > "$workdir.process_$rank.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "logs: $workdir.process_*.log"; exit $status
