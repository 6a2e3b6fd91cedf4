r"""Train input-pipeline throughput, without a model: is the host fast enough to feed it?

  python -m rsepm_jax.data.benchmark --config=configs/demo.py [--num_batches=50] \
      [--config.data.num_workers=4]

Builds `pipeline.train_iterator` for one process (the host batch is the config's global
batch), reads `--warmup_batches` (worker start-up, first reads), then times
`--num_batches` batches in `--num_windows` equal windows and prints the median window's
images/s, overall and per worker process (the main process counts as the one worker when
`data.num_workers` is 0).
"""
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from rsepm_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 50, "Batches timed after the warm-up.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 5, "Batches read before timing.")
_NUM_WINDOWS = flags.DEFINE_integer(
    "num_windows", 5, "Windows the timed batches are split into (median reported).")


def window_images_per_second(iterator, num_batches, num_windows, warmup_batches):
  """Images/s of each of `num_windows` consecutive windows of `num_batches` batches."""
  for _ in range(warmup_batches):
    next(iterator)
  batches_per_window = max(1, num_batches // num_windows)
  rates = []
  for _ in range(num_windows):
    start = time.perf_counter()
    num_images = sum(next(iterator)["image"].shape[0] for _ in range(batches_per_window))
    rates.append(num_images / (time.perf_counter() - start))
  return rates


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  iterator = pipeline.train_iterator(config.data, config.train.global_batch_size,
                                     config.seed, process_index=0, process_count=1)
  try:
    rates = window_images_per_second(iterator, _NUM_BATCHES.value, _NUM_WINDOWS.value,
                                      _WARMUP_BATCHES.value)
  finally:
    iterator.close()
  median = float(np.median(rates))
  workers = max(1, config.data.num_workers)
  print(f"dataset {config.data.name!r}, batch {config.train.global_batch_size}, crop "
        f"{config.data.crop_size}, {config.data.num_workers} worker processes x "
        f"{config.data.read_threads} read threads")
  print(f"windows (images/s): {', '.join(f'{rate:.1f}' for rate in rates)}")
  print(f"images/s: {median:.1f} overall, {median / workers:.1f} per worker (median window)")


if __name__ == "__main__":
  app.run(main)
