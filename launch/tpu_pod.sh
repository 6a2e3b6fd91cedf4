#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: copy the code to every worker, install, run on all workers.
#
#   launch/tpu_pod.sh NAME ZONE configs/voc.py gs://BUCKET/runs/voc_rsepm [--config.x=y ...]
#
# Every worker runs the same command; main.py calls jax.distributed.initialize() because
# RSEPM_DISTRIBUTED=1. Each worker logs to ~/rsepm_jax/worker_<index>.log. The global batch
# (config.train.global_batch_size) stays what the config says, whatever the slice size.
set -euo pipefail
name="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
here="$(cd "$(dirname "$0")/.." && pwd)"
gcloud compute tpus tpu-vm scp --zone="$zone" --worker=all --recurse \
  "$here/rsepm_jax" "$here/configs" "$here/requirements.txt" "$name":~/rsepm_jax_src
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e; cd ~/rsepm_jax_src
  python3 -m venv ~/rsepm_venv && . ~/rsepm_venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]' gcsfs
  worker=\$(hostname | sed 's/.*-w-//')
  RSEPM_DISTRIBUTED=1 nohup python -m rsepm_jax.main --config=$config --workdir=$workdir $* \
    > ~/rsepm_jax_src/worker_\$worker.log 2>&1 &"
echo "Started on all workers of $name; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $name --zone=$zone --worker=0 --command='tail -f ~/rsepm_jax_src/worker_0.log'"
