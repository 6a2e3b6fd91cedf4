#!/usr/bin/env bash
# A multi-host run simulated on one machine: N CPU processes with 2 devices each, talking over
# localhost (gloo collectives), exactly as N hosts of a pod would.
#
#   launch/local_processes.sh N CONFIG WORKDIR [--config.x=y ...]
#   launch/local_processes.sh 2 configs/demo.py:smoke /tmp/rsepm_multihost
#
# Extra arguments (`--config.x=y` overrides, `--mode=eval`, ...) go unchanged to every process.
#
# Logs: process R appends to WORKDIR.process_R.log (next to the workdir, whose parent folder is
#   created). Process 0 alone writes metrics.jsonl, eval/ and config.json into WORKDIR; every
#   process takes part in the checkpoints in WORKDIR/checkpoints.
# Preemption: `kill -TERM <pid of this script>` (or Ctrl-C) sends SIGTERM to every process, as a
#   spot VM or SLURM would to every host: each saves a checkpoint at the same step and exits 0,
#   and this script waits for all of them. A second signal kills them without saving.
# Resume: run the same command again; training continues from the latest checkpoint (data
#   position included). WORKDIR/done.json appears when training has finished.
# Exit status: 0 when every process exited 0; otherwise 1, after printing which process failed
#   and the end of its log.
#
# Environment (defaults chosen for one machine):
#   RSEPM_HEARTBEAT_TIMEOUT=30   seconds without heartbeats before a process is declared lost and
#                                the others stop with an error naming it
#   RSEPM_INIT_TIMEOUT=300       seconds for every process to join
#   RSEPM_SHUTDOWN_TIMEOUT=60    seconds a finishing process waits for the others
#   DEVICES_PER_PROCESS=2        CPU devices per process (JAX_NUM_CPU_DEVICES)
#   PORT=<random>                coordinator port on localhost
#   MODULE=rsepm_jax.main        the command every process runs; rsepm_jax.pipeline runs the
#                                multi-stage chain (give it --rw_config / --seg_config after the
#                                workdir)
set -euo pipefail

if [[ $# -lt 3 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
num="$1"; config="$2"; workdir="${3%/}"; shift 3
port="${PORT:-$((20000 + RANDOM % 20000))}"
mkdir -p "$(dirname "$workdir")"

pids=()
logs=()
signals=0
on_signal() {
  signals=$((signals + 1))
  if ((signals == 1)); then
    echo "local_processes.sh: $1 received; SIGTERM to every process (each saves a checkpoint and exits)." >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
  else
    echo "local_processes.sh: second signal; killing every process without saving." >&2
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
}
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # wait_for

for ((rank = 0; rank < num; rank++)); do
  log="$workdir.process_$rank.log"
  logs+=("$log")
  RSEPM_DISTRIBUTED=1 \
    RSEPM_COORDINATOR="localhost:$port" RSEPM_NUM_PROCESSES="$num" RSEPM_PROCESS_ID="$rank" \
    RSEPM_HEARTBEAT_TIMEOUT="${RSEPM_HEARTBEAT_TIMEOUT:-30}" \
    RSEPM_INIT_TIMEOUT="${RSEPM_INIT_TIMEOUT:-300}" \
    RSEPM_SHUTDOWN_TIMEOUT="${RSEPM_SHUTDOWN_TIMEOUT:-60}" \
    JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="${DEVICES_PER_PROCESS:-2}" \
    JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    python -m "${MODULE:-rsepm_jax.main}" --config="$config" --workdir="$workdir" "$@" \
    </dev/null >>"$log" 2>&1 &
  pids+=("$!")
done
echo "local_processes.sh: $num processes (pids ${pids[*]}), coordinator localhost:$port;" \
  "logs: $workdir.process_*.log" >&2

failed=0
for ((rank = 0; rank < num; rank++)); do
  rc=0
  wait_for "${pids[rank]}" || rc=$?
  if ((rc != 0)); then
    failed=1
    echo "local_processes.sh: process $rank (pid ${pids[rank]}) failed with exit status $rc;" \
      "end of ${logs[rank]}:" >&2
    { tail -n 25 "${logs[rank]}" | sed 's/^/  | /' >&2; } || true
  fi
done

if ((failed)); then
  echo "local_processes.sh: failed; re-run the same command to resume from the last checkpoint." >&2
  exit 1
fi
if ((signals)); then
  echo "local_processes.sh: every process stopped cleanly after the signal;" \
    "re-run the same command to continue." >&2
else
  echo "local_processes.sh: every process exited 0; logs: $workdir.process_*.log" >&2
fi
