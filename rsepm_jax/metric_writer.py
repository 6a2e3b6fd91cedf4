"""What a run records besides checkpoints: metrics, TensorBoard events, the log file, progress.

* `MetricWriter`: scalars to `workdir/metrics.jsonl`, and scalars and pictures to TensorBoard
  event files in `workdir/tensorboard` through tensorboardX (it needs protobuf, not
  TensorFlow). Only process 0 writes; the others get a writer that does nothing. Given the step
  a run resumes from, it drops what an earlier run recorded after that step, so steps replayed
  after a resume appear once.
* `log_to_file`: the console's log lines also go to `workdir/log.txt`.
* `CountProgress`: "eval val: 320/1449 images, 41.2 img/s, ETA 00:00:27" lines.
"""
import atexit
import json
import logging as py_logging
import os
import sys
import time

from absl import logging
from etils import epath
import jax
import numpy as np
import tensorboardX

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "log.txt"
# Pixels between the pictures of a TensorBoard image strip.
STRIP_GAP = 2
# TensorBoard events reach the file (tensorboardX's writer thread) at most this long after.
FLUSH_SECONDS = 30


class MetricWriter:
  """Appends `{"step": s, "time": t, **scalars}` lines to `workdir/metrics.jsonl` and writes the
  same scalars (tag = key) and image strips to TensorBoard when `tensorboard` is True.

  `start_step`: the step training starts from (the restored checkpoint's, 0 for a new run).
  Rows of later steps, written before the run that stopped, are dropped (the file is rewritten
  through a temporary file and a rename) and TensorBoard is told to purge events from
  `start_step + 1` on (tensorboardX's `purge_step`).
  """

  def __init__(self, workdir, start_step=0, tensorboard=True):
    self._enabled = jax.process_index() == 0
    self._path = epath.Path(workdir) / METRICS_FILE
    self._tensorboard = None
    if not self._enabled:
      return
    drop_rows_after(self._path, start_step)
    logdir = epath.Path(workdir) / TENSORBOARD_DIR
    if tensorboard and tensorboard_can_write(logdir):
      self._tensorboard = tensorboardX.SummaryWriter(
          str(logdir), purge_step=start_step + 1, flush_secs=FLUSH_SECONDS)
      atexit.register(self.close)  # a run that stops on an error keeps its last events

  def write(self, step, scalars):
    """Records `{name: number}` at `step`."""
    if not self._enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: float(v) for k, v in scalars.items()})
    with self._path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tensorboard is not None:
      for name, value in scalars.items():
        self._tensorboard.add_scalar(name, float(value), int(step), walltime=record["time"])

  def write_images(self, step, images):
    """Records `{tag: uint8 [N, H, W, 3]}` at `step`, each as one strip of its N pictures
    (`[H, N * W + (N - 1) * STRIP_GAP, 3]`, white gaps); TensorBoard only."""
    if self._tensorboard is None:
      return
    for tag, pictures in images.items():
      self._tensorboard.add_image(tag, image_strip(np.asarray(pictures)), int(step),
                                  dataformats="HWC")

  def close(self):
    """Writes out the queued TensorBoard events (tensorboardX writes them from a thread)."""
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def tensorboard_can_write(logdir):
  """Whether tensorboardX can write to `logdir`: False, with a warning, for a `gs://` path
  without google-cloud-storage (which tensorboardX's gs:// writer uploads with)."""
  if not str(logdir).startswith("gs://"):
    return True
  try:
    import google.cloud.storage  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    logging.warning("No TensorBoard events in %s: tensorboardX writes gs:// paths with "
                    "google-cloud-storage (pip install google-cloud-storage); %s is written as "
                    "usual.", logdir, METRICS_FILE)
    return False
  return True


def image_strip(pictures):
  """uint8 `[N, H, W, 3]` -> `[H, N * W + (N - 1) * STRIP_GAP, 3]`, side by side."""
  gap = np.full((pictures.shape[1], STRIP_GAP, 3), 255, np.uint8)
  parts = []
  for picture in pictures:
    parts += [picture, gap]
  return np.concatenate(parts[:-1], axis=1)


def drop_rows_after(path, step):
  """Rewrites the metrics file `path` without rows of steps after `step` (nor a line cut short by
  a crash): write a temporary file, then rename it over `path`. No-op if nothing is dropped."""
  if not path.exists():
    return
  lines = path.read_text().splitlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # an unfinished line of a run that was killed mid-write
  if len(kept) == len(lines):
    return
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text("".join(line + "\n" for line in kept))
  temporary.replace(path)
  logging.info("Resuming from step %d: dropped %d rows of %s written after it by an earlier run.",
               step, len(lines) - len(kept), path)


def read_metrics(workdir):
  """All records of `workdir/metrics.jsonl` as a list of dicts (empty if there is none)."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_log_file_handler = None


def log_to_file(workdir):
  """Process 0: from now on the console's log lines (INFO and above) also go to
  `workdir/log.txt`, appended after a line naming the command; replaces an earlier call's file.

  Only for a local workdir: on `gs://` the launch/ scripts keep each host's console log.
  """
  global _log_file_handler
  root = py_logging.getLogger()
  if _log_file_handler is not None:
    root.removeHandler(_log_file_handler)
    _log_file_handler.close()
    _log_file_handler = None
  if jax.process_index() != 0 or "://" in str(workdir):
    return
  handler = py_logging.FileHandler(epath.Path(workdir) / LOG_FILE, mode="a", encoding="utf-8")
  handler.setLevel(py_logging.INFO)
  handler.setFormatter(logging.PythonFormatter())
  for console_filter in logging.get_absl_handler().filters:  # e.g. orbax's per-save chatter
    handler.addFilter(console_filter)
  command = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
  handler.stream.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} {command}\n")
  root.addHandler(handler)
  _log_file_handler = handler


class CountProgress:
  """Logs "<what>: 320/1449 images, 41.2 img/s, ETA 00:00:27" every `interval_s` seconds and
  once all `total` images are done; the rate leaves out the first batch (compilation)."""

  def __init__(self, what, total, interval_s=10.0):
    self._what, self._total, self._interval_s = what, total, interval_s
    self._done = 0
    self._created = self._last_line = time.time()
    self._first = None  # (time, count) after the first batch

  def advance(self, count):
    """`count` more images done (the last batch's padding is capped at `total`)."""
    now = time.time()
    self._done = min(self._done + count, self._total)
    if self._first is None:
      self._first = (now, self._done)
    finished = self._done == self._total
    if not finished and now - self._last_line < self._interval_s:
      return
    self._last_line = now
    since, done_then = self._first if self._done > self._first[1] else (self._created, 0)
    rate = (self._done - done_then) / max(now - since, 1e-9)
    eta = (self._total - self._done) / max(rate, 1e-9)
    logging.info("%s: %d/%d images, %.1f img/s, ETA %s", self._what, self._done, self._total,
                 rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
