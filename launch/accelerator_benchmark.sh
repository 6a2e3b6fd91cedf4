#!/usr/bin/env bash
# Speed table of configs/voc.py on one accelerator (GPU or TPU), in under 8 minutes.
#
# Needs only:  pip install -r requirements.txt "jax[cuda12]"
#
#   launch/accelerator_benchmark.sh [--install] [OUT_DIR] [extra rsepm_jax.benchmark flags]
#
# --install runs the pip line above first. OUT_DIR defaults to $OUT if set, else
# ./benchmark_out; benchmark.json and benchmark.md are written there and the table is printed.
# BENCH_CONFIG overrides the config (default configs/voc.py; e.g. configs/demo.py:smoke to try
# the script on a CPU). Rows: the config's train step on synthetic random inputs of its shape
# (no data set, no ImageNet weights) with images/s, median step time, compile time, peak device
# memory and MFU; the eval pass, PAMR, SCG, Canny, EPM, the dense CRF, multi-scale + flip
# inference with and without the CRF (the paper protocol per image). Each row runs
# in its own process under a timeout and all rows share a 440 s budget, and the whole script is
# stopped at 480 s.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--install" ]]; then
  shift
  pip install -r requirements.txt "jax[cuda12]"
fi
out="${OUT:-benchmark_out}"
if [[ $# -gt 0 && "$1" != -* ]]; then
  out="$1"
  shift
fi
mkdir -p "$out"
python - <<'PY' || true
import jax
print("JAX", jax.__version__, "devices:", jax.devices(), flush=True)
PY
timeout --kill-after=5 480 python -m rsepm_jax.benchmark --config="${BENCH_CONFIG:-configs/voc.py}" \
  --isolate --budget_s=440 --train_timeout_s=270 --row_timeout_s=90 --repeats=10 \
  --out_dir="$out" "$@"
echo "written: $out/benchmark.json $out/benchmark.md"
