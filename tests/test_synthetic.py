"""Tests for the built-in synthetic WSSS dataset (rsepm_jax/data/synthetic.py)."""
import functools
import pickle
import re

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from rsepm_jax.data import synthetic

NUM_RECORDS = 200


@functools.lru_cache(maxsize=None)
def _records(num_classes=6, ignore_width=1, split="train", image_size=64, count=NUM_RECORDS):
  source = synthetic.SyntheticWSSS(count, image_size=image_size, num_classes=num_classes,
                                   seed=3, split=split, ignore_width=ignore_width)
  return tuple(source[i] for i in range(count))


def _different_label_nearby(mask, radius):
  """[H, W] bool: some pixel within Chebyshev distance `radius` has another label."""
  size = 2 * radius + 1
  return ((ndimage.maximum_filter(mask, size=size, mode="nearest") != mask)
          | (ndimage.minimum_filter(mask, size=size, mode="nearest") != mask))


def test_record_format():
  source = synthetic.SyntheticWSSS(5, image_size=48, num_classes=4, split="val")
  assert len(source) == 5
  assert source.class_names == ("disc", "square", "triangle", "star")
  for i in range(len(source)):
    record = source[i]
    assert set(record) == {"image", "mask", "labels", "id"}
    assert record["image"].dtype == np.uint8 and record["image"].shape == (48, 48, 3)
    assert record["mask"].dtype == np.uint8 and record["mask"].shape == (48, 48)
    assert record["labels"].dtype == np.float32 and record["labels"].shape == (4,)
    assert set(np.unique(record["labels"])) <= {0.0, 1.0}
    assert set(np.unique(record["mask"])) <= set(range(5)) | {255}
    assert record["id"] == f"synthetic_val_{i:06d}"
  assert source[np.int64(-1)]["id"] == "synthetic_val_000004"


def test_ten_classes_have_distinct_names():
  source = synthetic.SyntheticWSSS(1, num_classes=10)
  assert len(set(source.class_names)) == 10


def test_deterministic_random_access():
  source = synthetic.SyntheticWSSS(50, seed=7)
  forward = {i: source[i] for i in (0, 13, 49)}
  other = pickle.loads(pickle.dumps(synthetic.SyntheticWSSS(50, seed=7)))
  for i in (49, 0, 13, 13):
    for key in ("image", "mask", "labels"):
      np.testing.assert_array_equal(other[i][key], forward[i][key])
    assert other[i]["id"] == forward[i]["id"]
  reseeded = synthetic.SyntheticWSSS(50, seed=8)[13]
  assert not np.array_equal(reseeded["image"], forward[13]["image"])


def test_splits_give_different_images():
  train, val = _records(split="train", count=20), _records(split="val", count=20)
  for train_record, val_record in zip(train, val):
    assert not np.array_equal(train_record["image"], val_record["image"])


@pytest.mark.parametrize("num_classes,image_size", [(6, 64), (10, 64), (1, 32), (3, 96)])
def test_tags_equal_classes_in_mask(num_classes, image_size):
  records = _records(num_classes=num_classes, image_size=image_size, count=60)
  for record in records:
    present = set(np.unique(record["mask"]).tolist()) - {0, 255}
    tagged = set((np.flatnonzero(record["labels"]) + 1).tolist())
    assert present == tagged, record["id"]
    assert 1 <= len(tagged) <= min(3, num_classes)


def test_every_class_appears_and_objects_per_image():
  counts = np.zeros(6)
  objects_per_image = []
  for record in _records():
    counts += record["labels"]
    objects_per_image.append(record["labels"].sum())
  assert counts.min() >= 0.1 * NUM_RECORDS, counts
  # 1 to 3 objects are drawn; some images keep 2 or 3 classes after occlusion.
  assert set(objects_per_image) == {1.0, 2.0, 3.0}
  assert np.mean(np.array(objects_per_image) >= 2) > 0.3


def test_occlusion_and_scale_vary():
  touching = 0
  extents = []
  for record in _records(ignore_width=0):
    mask = record["mask"]
    horizontal = (mask[:, 1:] != mask[:, :-1]) & (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    vertical = (mask[1:] != mask[:-1]) & (mask[1:] > 0) & (mask[:-1] > 0)
    touching += horizontal.any() or vertical.any()
    for class_id in set(np.unique(mask).tolist()) - {0}:
      rows, cols = np.nonzero(mask == class_id)
      extents.append(max(np.ptp(rows), np.ptp(cols)) + 1)
  assert touching > 0.15 * NUM_RECORDS  # Objects regularly occlude or touch each other.
  extents = np.array(extents) / 64
  assert extents.min() < 0.2 and extents.max() > 0.55


@pytest.mark.parametrize("ignore_width", [1, 2])
def test_ignore_band_lies_on_label_borders(ignore_width):
  count = NUM_RECORDS if ignore_width == 1 else 60
  with_band, without_band = _records(ignore_width=ignore_width, count=count), _records(
      ignore_width=0, count=count)
  same_scene = 0
  for banded, plain in zip(with_band, without_band):
    assert not (plain["mask"] == 255).any()
    if not np.array_equal(banded["image"], plain["image"]):
      continue  # The band removed a class that was barely visible: a different scene.
    same_scene += 1
    band, labels = banded["mask"] == 255, plain["mask"]
    np.testing.assert_array_equal(banded["mask"][~band], labels[~band])
    # Band pixels are object pixels within ignore_width px of another label ...
    assert (labels[band] > 0).all()
    assert _different_label_nearby(labels, ignore_width)[band].all()
    # ... the band is ignore_width px wide ...
    assert (band & ~_different_label_nearby(labels, ignore_width - 1)).any()
    # ... and every border between two labels is covered on at least one side.
    for axis in (0, 1):
      first = [slice(None), slice(None)]
      second = [slice(None), slice(None)]
      first[axis], second[axis] = slice(1, None), slice(None, -1)
      border = labels[tuple(first)] != labels[tuple(second)]
      covered = band[tuple(first)] | band[tuple(second)]
      assert covered[border].all()
  assert same_scene > (0.95 if ignore_width == 1 else 0.8) * count


def test_backgrounds_are_cluttered_and_edges_crisp():
  border_steps, background_steps = [], []
  for record in _records(ignore_width=0, count=60):
    image, mask = record["image"].astype(np.float32), record["mask"]
    background = image[mask == 0]
    assert background.std(axis=0).mean() > 8.0, record["id"]
    step = np.abs(image[:, 1:] - image[:, :-1]).sum(-1)
    border = mask[:, 1:] != mask[:, :-1]
    both_background = (mask[:, 1:] == 0) & (mask[:, :-1] == 0)
    border_steps.append(step[border])
    background_steps.append(step[both_background])
  # Object outlines are sharp colour steps, much larger than typical background steps.
  assert np.median(np.concatenate(border_steps)) > 4 * np.median(
      np.concatenate(background_steps))


def test_colour_does_not_identify_the_class():
  features, classes = [], []
  for record in _records():
    for class_id in set(np.unique(record["mask"]).tolist()) - {0, 255}:
      features.append(record["image"][record["mask"] == class_id].mean(0))
      classes.append(class_id)
  features, classes = np.array(features), np.array(classes)
  half = len(classes) // 2
  centroids = np.stack([features[:half][classes[:half] == c].mean(0) for c in range(1, 7)])
  nearest = 1 + np.argmin(
      ((features[half:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  accuracy = np.mean(nearest == classes[half:])
  assert accuracy < 0.35, accuracy  # Chance is 1/6.
  for c in range(1, 7):  # Each class's mean colours span most of the RGB cube.
    assert np.ptp(features[classes == c], axis=0).min() > 120


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_images=0), "num_images"),
    (dict(num_images=4, num_classes=0), "num_classes"),
    (dict(num_images=4, num_classes=11), "num_classes"),
    (dict(num_images=4, image_size=16), "image_size"),
    (dict(num_images=4, ignore_width=3), "ignore_width"),
    (dict(num_images=4, ignore_width=-1), "ignore_width"),
    (dict(num_images=4, seed=-1), "seed"),
    (dict(num_images=4, split=""), "split"),
    (dict(num_images=4, object_size=(0.5, 0.2)), "object_size"),
    (dict(num_images=4, object_size=(0.0, 0.5)), "object_size"),
])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthetic.SyntheticWSSS(**kwargs)


def test_bad_index():
  source = synthetic.SyntheticWSSS(3)
  with pytest.raises(IndexError, match="out of range"):
    source[3]
  with pytest.raises(TypeError, match="index"):
    source["1"]


def test_from_config():
  config = ml_collections.ConfigDict({
      "num_classes": 5,
      "synthetic": {"num_train": 12, "num_eval": 4, "image_size": 32, "seed": 1,
                    "ignore_width": 1},
  })
  train = synthetic.from_config(config, "train")
  val = synthetic.from_config(config, "val")
  assert (len(train), len(val)) == (12, 4)
  assert train.class_names == synthetic.CLASS_NAMES[:5]
  assert train[0]["image"].shape == (32, 32, 3)
  assert re.fullmatch(r"synthetic_val_\d{6}", val[3]["id"])
  del config.synthetic.num_eval
  with pytest.raises(KeyError, match="num_eval"):
    synthetic.from_config(config, "val")
