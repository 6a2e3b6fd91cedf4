#!/usr/bin/env bash
# Multi-node GPU training: one process per node using all of its GPUs; every GPU of every node
# joins one "data" mesh, and the global batch stays the config's value.
#
# Under SLURM (one task per node; see launch/slurm.sbatch for a complete batch script):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=32 \
#       launch/gpu_multinode.sh configs/voc.py /shared/runs/voc [--config.x=y ...]
# Anywhere else, on every node with its own rank (the coordinator is node 0's address, any free
# port):
#   COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=0 launch/gpu_multinode.sh configs/voc.py /shared/runs/voc
#
# Arguments after WORKDIR (`--config.x=y` overrides, `--mode=eval`, ...) go unchanged to
# `python -m rsepm_jax.main`. WORKDIR must be on storage every node sees (shared filesystem or
# gs://): every process writes its part of the checkpoints; process 0 alone writes
# metrics.jsonl, eval/ and config.json. Run it with the Python environment that has
# requirements.txt and a CUDA build of jax (`pip install "jax[cuda12]==0.10.2"`, or cuda13:
# the jax version of requirements.txt) active; srun and sbatch pass the submitting shell's
# environment on.
#
# SLURM: when SLURM_JOB_ID is set and COORDINATOR is not, this script only sets
# RSEPM_DISTRIBUTED=1, and jax.distributed.initialize() reads the job step's variables itself
# (jax/_src/clusters/slurm_cluster.py, jax 0.10.2), so it must run inside `srun`:
#   SLURM_STEP_NODELIST  its first node is the coordinator (the host name must resolve on every
#                        node; JAX_COORDINATOR_ADDRESS=host:port overrides it)
#   SLURM_JOB_ID         coordinator port = 61440 + SLURM_JOB_ID % 4096 (JAX_COORDINATOR_PORT
#                        overrides it)
#   SLURM_NTASKS         number of processes;  SLURM_PROCID  this process's id
#   SLURM_LOCALID        JAX would make only GPU <SLURM_LOCALID> visible (one process per GPU);
#                        this script sets JAX_LOCAL_DEVICE_IDS to every GPU this task sees
#                        instead (one process per node). With one task per GPU (--ntasks-per-node
#                        = GPUs and --gpus-per-task=1) each task sees one GPU and that works too.
#
# Logs: the process's stdout/stderr (srun --output=..., see slurm.sbatch; by hand, redirect it),
#   plus WORKDIR/metrics.jsonl from process 0.
# Preemption: SIGTERM to the processes (SLURM sends it on scancel, at preemption and, with
#   `sbatch --signal=TERM@120`, 120 s before the time limit) makes every process save a checkpoint
#   at the same step and exit 0 ("Preempted at step N: ..."). SLURM's KillWait / GraceTime bound
#   how long it may take; after that the processes are killed and the steps since the last
#   periodic checkpoint (config.train.checkpoint_every) are lost.
# Resume: run the same command again (slurm.sbatch requeues itself until WORKDIR/done.json
#   exists); training continues from the latest checkpoint, data position included.
# A lost node: the others stop with an error naming the missing process after
#   RSEPM_HEARTBEAT_TIMEOUT seconds (default 100); re-run to resume.
#
# Network settings that matter (export them before srun; NCCL reads them in every process):
#   NCCL_SOCKET_IFNAME=eth0      the interface NCCL uses for its bootstrap and TCP traffic, when a
#                                node has several and the default choice hangs or is slow
#   NCCL_IB_HCA=mlx5_0,mlx5_1    which InfiniBand adapters to use; NCCL_IB_DISABLE=1 forces TCP
#   NCCL_DEBUG=WARN (or INFO)    print NCCL's problems (INFO: also the chosen transports)
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.9   share of each GPU's memory JAX reserves (default 0.75)
#   RSEPM_INIT_TIMEOUT (900), RSEPM_HEARTBEAT_TIMEOUT (100), RSEPM_SHUTDOWN_TIMEOUT (300), seconds
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }

export RSEPM_DISTRIBUTED=1

# Every GPU this task may use, as JAX device ordinals "0,1,...".
visible_gpus() {
  local n=0 ids
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    n=${#ids[@]}
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  if ((n > 0)); then seq -s, 0 $((n - 1)); fi
}

if [[ -n ${COORDINATOR:-} ]]; then
  export RSEPM_COORDINATOR="$COORDINATOR"
  export RSEPM_NUM_PROCESSES="${NUM_NODES:?set NUM_NODES (the number of nodes) with COORDINATOR}"
  export RSEPM_PROCESS_ID="${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1) with COORDINATOR}"
elif [[ -n ${SLURM_JOB_ID:-} ]]; then
  if [[ -z ${SLURM_STEP_NODELIST:-} || -z ${SLURM_PROCID:-} || -z ${SLURM_LOCALID:-} ]]; then
    die "inside a SLURM job but not in a job step: start this script with srun" \
      "(e.g. srun --ntasks-per-node=1 launch/gpu_multinode.sh ...), see launch/slurm.sbatch."
  fi
  # Let jax.distributed.initialize() read the SLURM variables (main.py passes explicit values
  # only when RSEPM_COORDINATOR is set).
  unset RSEPM_COORDINATOR RSEPM_NUM_PROCESSES RSEPM_PROCESS_ID
  echo "gpu_multinode.sh: SLURM job $SLURM_JOB_ID, process $SLURM_PROCID of ${SLURM_NTASKS:-?}" \
    "on $(hostname)" >&2
else
  die "set COORDINATOR=host:port, NUM_NODES and NODE_RANK, or run it under SLURM with srun."
fi

# Under SLURM, JAX would restrict each process to GPU <SLURM_LOCALID>; use all the task's GPUs.
if [[ -n ${SLURM_LOCALID:-} && -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
  gpus=$(visible_gpus)
  if [[ -n $gpus ]]; then
    export JAX_LOCAL_DEVICE_IDS="$gpus"
  else
    echo "gpu_multinode.sh: no GPU visible (CUDA_VISIBLE_DEVICES unset, no nvidia-smi);" \
      "JAX will use GPU $SLURM_LOCALID only. Set JAX_LOCAL_DEVICE_IDS=0,1,... to override." >&2
  fi
fi

exec python -m rsepm_jax.main --config="$config" --workdir="$workdir" "$@"
