"""Tests for rsepm_jax.data.transforms (spec 7.2), against loop references and invariants."""
import colorsys

import ml_collections
import numpy as np
import pytest

from rsepm_jax.data import transforms


def _record(height, width, seed=0, num_classes=4):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
      "mask": rng.choice(np.array([0, 1, 3, 255], np.uint8), (height, width)),
      "labels": np.eye(num_classes, dtype=np.float32)[0],
      "id": f"img{seed}",
  }


def _nearest_source_rows(in_size, out_size):
  """Centre-aligned nearest source index floor((dst + 0.5) * in / out), and exact ties.

  At an exact tie (the sample falls on a pixel border) the rounding direction is an
  implementation detail of the resizer, so those positions are not compared.
  """
  source = (np.arange(out_size) + 0.5) * in_size / out_size
  return np.floor(source).astype(int), source == np.floor(source)


def test_resize_long_side_range_aspect_and_nearest_mask():
  record = _record(30, 20)
  transform = transforms.RandomResizeLongSide(40, 44)
  long_sides = set()
  for seed in range(30):
    out = transform.random_map(record, np.random.default_rng(seed))
    height, width = out["mask"].shape
    assert out["image"].shape == (height, width, 3) and out["image"].dtype == np.uint8
    assert out["mask"].dtype == np.uint8
    assert 40 <= height <= 44 and abs(width - 20 * height / 30) <= 0.5
    long_sides.add(height)
    # Nearest: no new labels, and the centre-aligned nearest source pixel.
    assert set(np.unique(out["mask"])) <= {0, 1, 3, 255}
    rows, row_ties = _nearest_source_rows(30, height)
    cols, col_ties = _nearest_source_rows(20, width)
    expected = record["mask"][rows][:, cols]
    np.testing.assert_array_equal(out["mask"][~row_ties][:, ~col_ties],
                                  expected[~row_ties][:, ~col_ties])
    assert out["id"] == record["id"] and out["labels"] is record["labels"]
  assert long_sides == set(range(40, 45))  # both ends of the range are reachable

  wide = transforms.RandomResizeLongSide(16, 16).random_map(_record(10, 40),
                                                            np.random.default_rng(0))
  assert wide["mask"].shape == (4, 16)


def test_resize_keeps_a_flat_image_flat():
  record = _record(17, 23)
  record["image"][:] = (10, 120, 250)
  out = transforms.RandomResizeLongSide(30, 50).random_map(record, np.random.default_rng(3))
  assert np.all(out["image"] == np.array([10, 120, 250], np.uint8))


def test_horizontal_flip_moves_image_and_mask_together():
  record = _record(6, 9)
  flipped = {"image": record["image"][:, ::-1], "mask": record["mask"][:, ::-1]}
  outcomes = set()
  for seed in range(16):
    out = transforms.RandomHorizontalFlip(0.5).random_map(record, np.random.default_rng(seed))
    if np.array_equal(out["image"], record["image"]):
      np.testing.assert_array_equal(out["mask"], record["mask"])
      outcomes.add("kept")
    else:
      np.testing.assert_array_equal(out["image"], flipped["image"])
      np.testing.assert_array_equal(out["mask"], flipped["mask"])
      outcomes.add("flipped")
  assert outcomes == {"kept", "flipped"}
  always = transforms.RandomHorizontalFlip(1.0).random_map(record, np.random.default_rng(0))
  np.testing.assert_array_equal(always["mask"], flipped["mask"])


def _planes(image):
  return np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)


def test_colour_ops_match_pixel_loop_references():
  image = _record(5, 7, seed=4)["image"].astype(np.float32)
  image[0, 0] = (40, 40, 40)  # grey: hue undefined, must stay grey
  image[0, 1] = (255, 0, 255)
  gray = image @ np.array([0.299, 0.587, 0.114])
  brightness = transforms.adjust_brightness(_planes(image), 1.3).transpose(1, 2, 0)
  np.testing.assert_allclose(brightness, np.clip(image * 1.3, 0, 255), atol=1e-3)
  contrast = transforms.adjust_contrast(_planes(image), 0.6).transpose(1, 2, 0)
  np.testing.assert_allclose(contrast, np.clip(0.6 * image + 0.4 * gray.mean(), 0, 255),
                             atol=1e-3)
  saturation = transforms.adjust_saturation(_planes(image), 1.4).transpose(1, 2, 0)
  np.testing.assert_allclose(saturation,
                             np.clip(1.4 * image - 0.4 * gray[..., None], 0, 255), atol=1e-3)
  for shift in (0.1, -0.25, 0.5):
    hue = transforms.adjust_hue(_planes(image), shift).transpose(1, 2, 0)
    expected = np.zeros_like(image)
    for y in range(image.shape[0]):
      for x in range(image.shape[1]):
        h, s, v = colorsys.rgb_to_hsv(*(image[y, x] / 255.0))
        expected[y, x] = np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255.0
    np.testing.assert_allclose(hue, expected, atol=1e-2)


def test_colour_jitter_dtype_range_identity_and_determinism():
  record = _record(16, 24, seed=5)
  identity = transforms.ColorJitter(0, 0, 0, 0).random_map(record, np.random.default_rng(0))
  np.testing.assert_array_equal(identity["image"], record["image"])

  jitter = transforms.ColorJitter(0.3, 0.3, 0.3, 0.1)
  first = jitter.random_map(record, np.random.default_rng(7))
  again = jitter.random_map(record, np.random.default_rng(7))
  other = jitter.random_map(record, np.random.default_rng(8))
  assert first["image"].dtype == np.uint8 and first["image"].shape == (16, 24, 3)
  np.testing.assert_array_equal(first["image"], again["image"])
  assert not np.array_equal(first["image"], other["image"])
  assert not np.array_equal(first["image"], record["image"])
  np.testing.assert_array_equal(first["mask"], record["mask"])

  # Brightness alone: the output is the input times one factor in [0.7, 1.3], rounded.
  bright = transforms.ColorJitter(0.3, 0, 0, 0).random_map(record, np.random.default_rng(1))
  source = record["image"].astype(np.float64)
  factor = (bright["image"].astype(np.float64) * source).sum() / (source * source).sum()
  assert 0.7 <= factor <= 1.3
  np.testing.assert_allclose(bright["image"], np.clip(np.rint(source * factor), 0, 255),
                             atol=1)
  with pytest.raises(ValueError, match="hue"):
    transforms.ColorJitter(0.3, 0.3, 0.3, 0.6)


def _check_crop(record, out, size):
  top, left, bottom, right = out["crop_box"]
  assert out["crop_box"].dtype == np.int32
  assert out["image"].shape == (size, size, 3) and out["mask"].shape == (size, size)
  inside = np.zeros((size, size), bool)
  inside[top:bottom, left:right] = True
  assert np.all(out["image"][~inside] == 0) and np.all(out["mask"][~inside] == 255)
  # The valid region is a window of the source image at some offset; find it by search.
  height, width = bottom - top, right - left
  window_image = out["image"][top:bottom, left:right]
  window_mask = out["mask"][top:bottom, left:right]
  src_height, src_width = record["mask"].shape
  matches = [
      (y, x) for y in range(src_height - height + 1) for x in range(src_width - width + 1)
      if np.array_equal(record["image"][y:y + height, x:x + width], window_image)
      and np.array_equal(record["mask"][y:y + height, x:x + width], window_mask)]
  assert matches
  return height, width


def test_random_crop_of_smaller_and_larger_images():
  crop = transforms.RandomCrop(16)
  small = _record(10, 13, seed=1)
  boxes = set()
  for seed in range(8):
    out = crop.random_map(small, np.random.default_rng(seed))
    assert _check_crop(small, out, 16) == (10, 13)  # the whole image, padded
    boxes.add(tuple(out["crop_box"]))
  assert len(boxes) > 1  # placed at random offsets inside the canvas

  large = _record(20, 30, seed=2)
  for seed in range(4):
    out = crop.random_map(large, np.random.default_rng(seed))
    np.testing.assert_array_equal(out["crop_box"], [0, 0, 16, 16])
    _check_crop(large, out, 16)

  mixed = crop.random_map(_record(8, 40, seed=3), np.random.default_rng(0))
  top, left, bottom, right = mixed["crop_box"]
  assert (bottom - top, left, right) == (8, 0, 16)

  again = crop.random_map(small, np.random.default_rng(5))
  first = crop.random_map(small, np.random.default_rng(5))
  for key in ("image", "mask", "crop_box"):
    np.testing.assert_array_equal(first[key], again[key])


def test_pad_to_size():
  record = _record(9, 14, seed=6)
  out = transforms.PadToSize(16).map(record)
  np.testing.assert_array_equal(out["crop_box"], [0, 0, 9, 14])
  np.testing.assert_array_equal(out["image"][:9, :14], record["image"])
  np.testing.assert_array_equal(out["mask"][:9, :14], record["mask"])
  assert np.all(out["image"][9:] == 0) and np.all(out["image"][:, 14:] == 0)
  assert np.all(out["mask"][9:] == 255) and np.all(out["mask"][:, 14:] == 255)
  with pytest.raises(ValueError, match=r"'img6'.*9x14.*12x12"):
    transforms.PadToSize(12).map(record)


def _data_config(**overrides):
  config = ml_collections.ConfigDict(dict(resize_range=(20, 30), hflip=True,
                                          color_jitter=(0.3, 0.3, 0.3, 0.1), crop_size=16,
                                          eval_size=32))
  config.update(overrides)
  return config


def test_transform_lists_from_config():
  full = transforms.train_transforms(_data_config())
  assert [type(t) for t in full] == [transforms.RandomResizeLongSide,
                                     transforms.RandomHorizontalFlip,
                                     transforms.ColorJitter, transforms.RandomCrop]
  assert (full[0].min_size, full[0].max_size, full[-1].size) == (20, 30, 16)
  bare = transforms.train_transforms(_data_config(resize_range=None, hflip=False,
                                                  color_jitter=None))
  assert [type(t) for t in bare] == [transforms.RandomCrop]
  (pad,) = transforms.eval_transforms(_data_config())
  assert isinstance(pad, transforms.PadToSize) and pad.size == 32
