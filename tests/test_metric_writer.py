"""TensorBoard events (read back without TensorFlow), metrics.jsonl after a resume, the log file
and the evaluation progress lines, from real smoke training runs on the 8 test devices."""
import io
import json
import struct
import subprocess
import sys
import time
import types

from absl import logging
import numpy as np
from PIL import Image
import pytest
from tensorboardX.proto import event_pb2

from rsepm_jax import metric_writer
from rsepm_jax import train
from rsepm_jax.configs import demo
from rsepm_jax.data import classes


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data):
  """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus 0xa282ead8."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
  """Every `Event` of a TFRecord event file: u64 length, u32 masked CRC of the length bytes,
  the data, u32 masked CRC of the data (little-endian), checksums checked."""
  data = path.read_bytes()
  events, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    record = data[offset + 12:offset + 12 + length]
    (record_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
    assert header_crc == masked_crc32c(header) and record_crc == masked_crc32c(record)
    events.append(event_pb2.Event.FromString(record))
    offset += 16 + length
  return events


def event_files(workdir):
  return sorted((workdir / metric_writer.TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def scalars_and_images(events):
  """({(tag, step): value}, {(tag, step): PIL image}) of `events`, each key once."""
  scalars, images = {}, {}
  for event in events:
    for value in event.summary.value:
      key = (value.tag, event.step)
      if value.HasField("image"):
        assert key not in images
        images[key] = Image.open(io.BytesIO(value.image.encoded_image_string))
      else:
        assert key not in scalars
        scalars[key] = value.simple_value
  return scalars, images


def smoke_config(**train_overrides):
  config = demo.get_config("smoke")
  config.train.update(train_overrides)
  return config


@pytest.fixture
def info_logs():
  """absl INFO lines on, as under `absl.app.run` (tests default to WARNING)."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)
  yield
  logging.set_verbosity(verbosity)


def test_training_writes_events_pictures_and_log_and_a_resume_replays_no_row(tmp_path, info_logs):
  # The config of test_train's run (one compilation of the step for both). RecurSeed and mixing
  # are on from step 4, so the pictures at the evaluation of step 12 and at the end show all.
  config = smoke_config(num_epochs=6, log_every=1, eval_every=12, checkpoint_every=12)
  train.train_and_evaluate(config, str(tmp_path))

  # ---------------------------------------------------------- scalars equal metrics.jsonl
  (events_file,) = event_files(tmp_path)
  scalars, images = scalars_and_images(read_events(events_file))
  first_rows = metric_writer.read_metrics(tmp_path)
  expected = {}
  for row in first_rows:
    expected.update({(k, row["step"]): v for k, v in row.items() if k not in ("step", "time")})
  assert {tag for tag, _ in expected} >= {"loss", "loss_seg", "lr", "eval_cam_miou"}
  assert scalars.keys() == expected.keys()
  for key, value in expected.items():
    assert scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key

  # ---------------------------------------------------------- pictures
  size = config.data.crop_size
  num = config.train.num_summary_images
  strip_width = num * size + (num - 1) * metric_writer.STRIP_GAP
  tags = ("train/input", "train/cam", "train/seeds", "train/mixed", "train/mixed_seeds")
  assert images.keys() == {(tag, step) for tag in tags for step in (12, 24)}
  for image in images.values():
    assert image.size == (strip_width, size) and image.mode == "RGB"
  # Seeds and mixed targets are palette colours (gaps white); some pixels are confident seeds.
  palette = {tuple(c) for c in classes.color_palette()} | {(255, 255, 255)}
  for tag in ("train/seeds", "train/mixed_seeds"):
    pixels = np.asarray(images[tag, 24]).reshape(-1, 3)
    assert {tuple(p) for p in pixels} <= palette
    assert np.any(np.all(pixels != (224, 224, 192), axis=1) & np.all(pixels != 255, axis=1))

  # ---------------------------------------------------------- log file
  log = (tmp_path / metric_writer.LOG_FILE).read_text()
  assert log.startswith("===== ")
  assert "step 24/24 loss=" in log and "eval val: 16/16 images" in log

  # ---------------------------------------------------------- resume after losing step 24
  # The re-run resumes from checkpoint 12 and replays steps 13-24 (after a kill mid-write).
  for path in sorted((tmp_path / "checkpoints" / "24").rglob("*"), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  (tmp_path / "checkpoints" / "24").rmdir()
  with (tmp_path / metric_writer.METRICS_FILE).open("a") as f:
    f.write('{"step": 25, "lo')
  train.train_and_evaluate(config, str(tmp_path))
  rows = metric_writer.read_metrics(tmp_path)
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, 25))
  assert [r["step"] for r in rows if "eval_cam_miou" in r] == [12, 24]
  first_run_end = max(r["time"] for r in first_rows)
  assert all((r["time"] > first_run_end) == (r["step"] > 12) for r in rows)
  assert log.count("===== ") == 1
  assert (tmp_path / metric_writer.LOG_FILE).read_text().count("===== ") == 2  # appended

  first, second = (read_events(path) for path in event_files(tmp_path))
  # TensorBoard drops the first file's events from the purge step on (SessionLog START).
  purges = [e.step for e in second if e.HasField("session_log")
            and e.session_log.status == event_pb2.SessionLog.START]
  assert purges == [13]
  assert {e.step for e in first if e.summary.value} == set(range(1, 25))
  assert {e.step for e in second if e.summary.value} == set(range(13, 25))


def test_events_written_before_an_error_reach_the_file(tmp_path):
  # tensorboardX writes from a thread and flushes every FLUSH_SECONDS: the exit flushes too.
  script = ("import sys; from rsepm_jax import metric_writer; "
            "w = metric_writer.MetricWriter(sys.argv[1]); "
            "[w.write(s, {'loss': 1.0 / s}) for s in (1, 2, 3)]; raise SystemExit('error')")
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 1 and "error" in result.stderr
  (events_file,) = event_files(tmp_path)
  scalars, _ = scalars_and_images(read_events(events_file))
  assert scalars == {("loss", s): pytest.approx(1.0 / s) for s in (1, 2, 3)}


def test_gs_workdir_without_google_cloud_storage_skips_tensorboard(monkeypatch):
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # import fails
  assert not metric_writer.tensorboard_can_write("gs://bucket/run/tensorboard")
  assert metric_writer.tensorboard_can_write("/tmp/run/tensorboard")


def test_drop_rows_after_keeps_earlier_rows_and_drops_a_cut_line(tmp_path):
  path = tmp_path / metric_writer.METRICS_FILE
  rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
  metric_writer.drop_rows_after(path, 2)
  assert metric_writer.read_metrics(tmp_path) == rows[:2]
  assert not (tmp_path / (path.name + ".tmp")).exists()
  before = path.stat().st_mtime_ns
  metric_writer.drop_rows_after(path, 2)  # nothing to drop: not rewritten
  assert path.stat().st_mtime_ns == before


def test_count_progress_logs_by_time_and_at_the_end(monkeypatch):
  lines = []
  clock = iter([0.0, 1.0, 5.0, 30.0, 31.0])  # created, then after each batch
  monkeypatch.setattr(metric_writer, "logging", types.SimpleNamespace(
      info=lambda fmt, *args: lines.append(fmt % args)))
  monkeypatch.setattr(metric_writer, "time", types.SimpleNamespace(
      time=lambda: next(clock), strftime=time.strftime, gmtime=time.gmtime))
  progress = metric_writer.CountProgress("eval val", 50, interval_s=10.0)
  for _ in range(4):
    progress.advance(16)  # 16, 32, 48, 50 (the last batch's padding capped)
  # Not after batches 1 (first, compiling) and 2 (4 s < 10 s): at 30 s, and the final line.
  # The rate leaves out the first batch: 32 images in 29 s, then 34 in 30 s.
  assert lines == ["eval val: 48/50 images, 1.1 img/s, ETA 00:00:01",
                   "eval val: 50/50 images, 1.1 img/s, ETA 00:00:00"]
