"""Round trip: source -> prepare (TFDS ArrayRecord, no TensorFlow) -> array_record source."""
import pickle

import grain
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from rsepm_jax.data import array_record
from rsepm_jax.data import classes
from rsepm_jax.data import prepare
from rsepm_jax.data import sources

H, W = 16, 20


def _make_voc(root):
  """Three train images: with mask + XML, with mask only, with XML only (no mask)."""
  rng = np.random.default_rng(0)
  for index, image_id in enumerate(("a1", "a2", "a3")):
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
    if index < 2:
      mask = np.zeros((H, W), np.uint8)
      mask[2:9, 3:11] = 5 + index
      mask[0] = 255
      palette_mask = Image.fromarray(mask)
      palette_mask.putpalette(classes.color_palette().reshape(-1).tolist())
      (root / "SegmentationClassAug").mkdir(exist_ok=True)
      palette_mask.save(root / "SegmentationClassAug" / f"{image_id}.png")
    if index != 1:
      (root / "Annotations").mkdir(exist_ok=True)
      (root / "Annotations" / f"{image_id}.xml").write_text(
          "<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
          "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
  (root / "ImageSets" / "Segmentation").mkdir(parents=True)
  (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a1\na2\na3\n")
  (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a2\n")
  return root


def _assert_records_equal(actual, expected):
  assert actual["id"] == expected["id"]
  for key in ("image", "mask", "labels"):
    assert actual[key].dtype == expected[key].dtype
    np.testing.assert_array_equal(actual[key], expected[key])


def test_voc_round_trip_through_prepare(tmp_path):
  root = _make_voc(tmp_path / "voc")
  out = tmp_path / "out"
  prepare.main(["--dataset=voc", f"--root={root}", "--splits=train,val", f"--out={out}",
                "--eval_splits=val", "--allow_subset", "--num_threads=2"])
  config = ml_collections.ConfigDict(
      {"name": "voc", "root": str(root), "allow_subset": True, "eval_split": "val"})
  for split in ("train", "val"):
    voc_source = sources.make_source(config, split)
    stored = sources.make_source(ml_collections.ConfigDict(
        {"name": "array_record", "root": str(out), "dataset": "voc"}), split)
    assert len(stored) == len(voc_source) and stored.num_classes == 20
    for index in range(len(voc_source)):
      _assert_records_equal(stored[index], voc_source[index])

  # The original file bytes are stored: JPEGs are not re-encoded; no mask is b"".
  raw = tfds.builder_from_directory(str(array_record.dataset_dir(out, "voc"))).as_data_source(
      "train")
  for index, image_id in enumerate(("a1", "a2", "a3")):
    assert raw[index]["image"] == (root / "JPEGImages" / f"{image_id}.jpg").read_bytes()
  assert raw[1]["mask"] == (root / "SegmentationClassAug" / "a2.png").read_bytes()
  assert raw[2]["mask"] == b""
  stored_train = array_record.ArrayRecordSource(out, "voc", "train")
  np.testing.assert_array_equal(stored_train[2]["mask"], np.full((H, W), 255, np.uint8))

  with pytest.raises(FileExistsError, match="already exists"):
    prepare.main(["--dataset=voc", f"--root={root}", "--splits=train", f"--out={out}",
                  "--allow_subset"])
  with pytest.raises(ValueError, match=r"Split 'test' is not in .*\['train', 'val'\]"):
    array_record.ArrayRecordSource(out, "voc", "test")


class _ArraySource:
  """A source with arrays only (like a synthetic one): stored as lossless PNG."""

  def __init__(self):
    rng = np.random.default_rng(1)
    self._records = [{
        "image": rng.integers(0, 256, (H + i, W, 3), dtype=np.uint8),
        "mask": rng.choice(np.array([0, 1, 2, 255], np.uint8), (H + i, W)),
        "labels": np.array([1, i % 2, 0], np.float32), "id": f"synthetic_{i}"} for i in range(3)]

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]


def test_array_source_round_trip_and_grain(tmp_path):
  source = _ArraySource()
  array_record.write_array_record({"train": source}, dataset="toy", data_dir=tmp_path,
                                  num_threads=2)
  stored = array_record.ArrayRecordSource(tmp_path, "toy", "train")
  assert stored.num_classes == 3
  restored = pickle.loads(pickle.dumps(stored))  # grain workers receive pickled sources.
  for index in range(len(source)):
    _assert_records_equal(restored[index], source[index])
  ids = [record["id"] for record in grain.MapDataset.source(stored)]
  assert ids == ["synthetic_0", "synthetic_1", "synthetic_2"]


def test_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="rsepm_jax.data.prepare --dataset=coco"):
    array_record.ArrayRecordSource(tmp_path, "coco", "train2014")
