"""Bad data under grain worker processes, the pre-flight check and the bad-file count (issue 10).

Real files (tiny VOCdevkit trees from test_voc's helpers), real worker processes
(`data.num_workers=2`) and real `train.train_and_evaluate` runs that stop before compiling.
"""
import logging
import pickle

import pytest

from rsepm_jax import train
from rsepm_jax.configs import demo
from rsepm_jax.configs import voc
from rsepm_jax.data import array_record
from rsepm_jax.data import pipeline
from rsepm_jax.data import preflight
from rsepm_jax.data import records
from rsepm_jax.data import sources
from tests import test_voc

NUM_TRAIN = 8  # one global batch of the smoke config


def _corrupt_jpeg(root, image_id):
  path = root / "JPEGImages" / f"{image_id}.jpg"
  path.write_bytes(b"this is not a JPEG" * 20)
  return path


def _truncated_jpeg(root, image_id):
  """Header intact, pixel data cut: passes the pre-flight check, fails when decoded."""
  path = root / "JPEGImages" / f"{image_id}.jpg"
  data = path.read_bytes()
  path.write_bytes(data[:data.index(b"\xff\xda") + 30])  # up to just after start-of-scan
  return path


def _empty_tags(root, image_id):
  path = root / "Annotations" / f"{image_id}.xml"
  test_voc._write_xml(path, [test_voc._object("cat", (4, 4, 4, 9))])  # zero-width box only
  return path


def _mask_value_50(root, image_id):
  path = root / "SegmentationClassAug" / f"{image_id}.png"
  mask = test_voc._mask_with_border(test_voc.DOG)
  mask[0, :3] = 50
  test_voc._write_palette_png(path, mask)
  return path


def _make_tree(root, bad_train=(), bad_val=()):
  """A VOCdevkit with `NUM_TRAIN` train_aug and 4 val records (masks and XMLs); the i-th maker
  of `bad_train` / `bad_val` spoils record i of that split. Returns the spoiled paths."""
  def records_of(first, count):
    return {f"2007_{i:06d}": (test_voc._smooth_image(i % 4), test_voc._mask_with_border(test_voc.DOG),
                              [test_voc._object("dog", (8, 6, 19, 17))])
            for i in range(first, first + count)}
  train_records, val_records = records_of(0, NUM_TRAIN), records_of(100, 4)
  test_voc._make_vocdevkit(root, train_records, split="train_aug", mask_dir="SegmentationClassAug")
  test_voc._make_vocdevkit(root, val_records, split="val", mask_dir="SegmentationClassAug")
  return ([make(root, image_id) for make, image_id in zip(bad_train, train_records)]
          + [make(root, image_id) for make, image_id in zip(bad_val, val_records)])


def _config(root, **data):
  config = voc.get_config("smoke")
  config.data.root = str(root)
  config.data.allow_subset = True
  config.data.eval_size = 64
  config.train.global_batch_size = NUM_TRAIN
  config.data.update(data)
  return config


def test_bad_record_error_survives_pickling():
  error = pickle.loads(pickle.dumps(records.BadRecordError("/data/a.jpg", "corrupt image")))
  assert (type(error), error.path, error.problem, str(error)) == (
      records.BadRecordError, "/data/a.jpg", "corrupt image", "/data/a.jpg: corrupt image")


@pytest.mark.parametrize("make_bad", [_corrupt_jpeg, _truncated_jpeg, _empty_tags, _mask_value_50],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_record_under_workers_names_the_file(tmp_path, make_bad):
  """The error a worker process raises reaches the main process with the file named."""
  bad_path, = _make_tree(tmp_path, bad_train=[make_bad])
  config = _config(tmp_path, num_workers=2)
  iterator = pipeline.train_iterator(config.data, NUM_TRAIN, seed=0)
  try:
    with pytest.raises(records.BadRecordError, match=str(bad_path)):
      for _ in range(2):  # the two workers' first batches hold epochs 0 and 1: every record
        next(iterator)
  finally:
    iterator.close()


def test_skip_bad_records_under_workers_finishes_and_counts_each_file_once(tmp_path, capfd,
                                                                          caplog):
  bad_paths = _make_tree(tmp_path / "data", bad_val=[_mask_value_50], bad_train=[
      _corrupt_jpeg, _empty_tags, _mask_value_50,
      _truncated_jpeg])  # found by a worker: the pre-flight check reads headers only
  config = _config(tmp_path / "data", num_workers=2, skip_bad_records=True)
  config.train.num_epochs = 2  # the workers read every train file twice
  config.model.with_decoder = False  # the smallest step to compile: the CAM alone
  config.train.tensorboard = False
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["num_images"] == 3  # the bad val image is not scored
  messages = [record.getMessage() for record in caplog.records]
  assert messages[-1].startswith("5 bad files skipped")
  worker_output = capfd.readouterr().err  # worker processes log there, the main one to caplog
  for path in bad_paths:
    assert str(path) in messages[-1]
    warnings = [m for m in messages + worker_output.splitlines() if f"Skipping bad file {path}" in m]
    assert len(warnings) == 1, warnings


def test_bad_files_of_every_split_stop_training_before_the_first_step(tmp_path):
  """The bad files of the train and evaluation splits are named together, before anything trains."""
  bad_paths = _make_tree(tmp_path / "data", bad_train=[_empty_tags],
                         bad_val=[_mask_value_50, _corrupt_jpeg])
  workdir = tmp_path / "run"
  with pytest.raises(preflight.BadSplitError) as error:
    train.train_and_evaluate(_config(tmp_path / "data"), str(workdir))
  message = str(error.value)
  assert "split 'train_aug'" in message and "split 'val'" in message and "2 bad files" in message
  assert all(str(path) in message for path in bad_paths)
  assert "mask values [50]" in message and "not a format PIL recognises" in message
  assert "data.skip_bad_records" in message
  assert not (workdir / "metrics.jsonl").exists()
  assert not [path for path in workdir.rglob("*") if path.name.isdigit()]  # no checkpoint


def test_preflight_skips_and_counts_once_what_reading_finds_again(tmp_path, caplog):
  bad_paths = _make_tree(tmp_path, bad_train=[_empty_tags], bad_val=[_mask_value_50])
  config = _config(tmp_path, skip_bad_records=True)

  @records.logs_bad_files
  def run():
    preflight.check_training_splits(config.data)
    for split in ("train_aug", "val"):  # read after the check, as training and evaluation do
      source = sources.make_source(config.data, split)
      assert sum(source[index] is None for index in range(len(source))) == 1
    return records.current_bad_file_log().files()

  with caplog.at_level(logging.WARNING):
    bad_files = run()
  assert sorted(bad_files) == sorted(map(str, bad_paths))
  messages = [record.getMessage() for record in caplog.records]
  for path in bad_paths:
    assert sum(m.startswith(f"Skipping bad file {path}") for m in messages) == 1
  assert messages[-1].startswith("2 bad files skipped")


def test_preflight_names_images_larger_than_eval_size(tmp_path):
  _make_tree(tmp_path)
  config = _config(tmp_path, eval_size=test_voc.W - 1)
  with pytest.raises(ValueError, match=rf"larger than data.eval_size={test_voc.W - 1} in the "
                                       r"evaluated splits \(4;"
                                       rf".*2007_000100.jpg \({test_voc.H}x{test_voc.W}\)"
                                       rf".*data.eval_size >= {test_voc.W}"):
    preflight.check_training_splits(config.data)
  preflight.check_splits(config.data, train=("val",))  # the train transforms resize: no limit


def test_preflight_of_array_record_and_synthetic_splits(tmp_path, caplog):
  """ArrayRecord: the cheap checks (records present, the first decodes, its size); synthetic: none."""
  _make_tree(tmp_path / "voc")
  voc_config = _config(tmp_path / "voc")
  array_record.write_array_record(
      {split: sources.make_source(voc_config.data, split) for split in ("train_aug", "val")},
      dataset="voc", data_dir=tmp_path / "tfds", num_threads=2)
  config = _config(tmp_path / "tfds", name="array_record", dataset="voc")
  with caplog.at_level(logging.INFO):
    preflight.check_training_splits(config.data)
    preflight.check_training_splits(demo.get_config("smoke").data)
  assert "split 'val'" in caplog.text and "4 records; the first decodes" in caplog.text
  assert "split 'train' of data.name='synthetic' is generated in memory" in caplog.text
  config.data.eval_size = test_voc.W - 1
  with pytest.raises(ValueError, match=r"splits \(1;.*split='val'"
                                       rf"\)\[0\] \({test_voc.H}x{test_voc.W}\)"):
    preflight.check_training_splits(config.data)
