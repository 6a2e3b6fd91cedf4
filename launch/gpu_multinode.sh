#!/usr/bin/env bash
# Multi-node GPU: run this on every node (e.g. from SLURM or by hand) with its rank.
#
#   COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=0 launch/gpu_multinode.sh configs/voc.py /shared/runs/voc
#
# All GPUs of all nodes form one "data" mesh; the global batch stays the config's value.
set -euo pipefail
config="$1"; workdir="$2"; shift 2
export RSEPM_DISTRIBUTED=1
export RSEPM_COORDINATOR="${COORDINATOR:?set COORDINATOR=host:port}"
export RSEPM_NUM_PROCESSES="${NUM_NODES:?set NUM_NODES}"
export RSEPM_PROCESS_ID="${NODE_RANK:?set NODE_RANK}"
exec python -m rsepm_jax.main --config="$config" --workdir="$workdir" "$@"
