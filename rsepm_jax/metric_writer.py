"""Scalars to `metrics.jsonl` in the workdir, and to TensorBoard when TensorFlow is installed.

Only process 0 writes; the others get a writer that does nothing. TensorBoard goes through
flax's summary writer, which needs TensorFlow; without it the JSONL file is the record.
"""
import json
import time

from absl import logging
from etils import epath
import jax


class MetricWriter:
  """Appends `{"step": s, "time": t, **scalars}` lines to `workdir/metrics.jsonl`."""

  def __init__(self, workdir):
    self._enabled = jax.process_index() == 0
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._tensorboard = None
    if self._enabled:
      try:
        from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
        self._tensorboard = tensorboard.SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
      except ImportError:
        logging.info("TensorFlow not installed: metrics go to %s only.", self._path)

  def write(self, step, scalars):
    if not self._enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: float(v) for k, v in scalars.items()})
    with self._path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tensorboard is not None:
      for name, value in scalars.items():
        self._tensorboard.scalar(name, float(value), int(step))
      self._tensorboard.flush()


def read_metrics(workdir):
  """All records of `workdir/metrics.jsonl` as a list of dicts (empty if there is none)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
