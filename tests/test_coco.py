"""Tests for rsepm_jax.data.prepare_coco and rsepm_jax.data.coco on a tiny fake COCO tree."""
import importlib.util
import json
import logging

import numpy as np
from PIL import Image
import pytest

from rsepm_jax.data import classes
from rsepm_jax.data import coco
from rsepm_jax.data import prepare_coco
from rsepm_jax.data import records

H, W = 20, 24
SPLIT = "train2014"
# COCO category ids (with gaps) -> our class ids: person 1 -> 1, dog 18 -> 17, car 3 -> 3,
# toothbrush 90 -> 80.
PERSON, DOG, CAR, TOOTHBRUSH = 1, 17, 3, 80


def _rectangle(x0, y0, x1, y1):
  """Polygon of the pixel-edge rectangle: covers columns x0..x1-1 and rows y0..y1-1."""
  return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _uncompressed_rle(pixels):
  """Reference COCO RLE: column-major runs, starting with a (possibly empty) run of 0s."""
  counts, current, run = [], False, 0
  for value in pixels.T.reshape(-1):
    if bool(value) != current:
      counts.append(run)
      current, run = bool(value), 0
    run += 1
  counts.append(run)
  return {"counts": counts, "size": list(pixels.shape)}


def _crowd_pixels():
  pixels = np.zeros((H, W), bool)
  pixels[10:18, 2:22] = True
  return pixels


def _annotation(ann_id, image_id, category_id, segmentation, iscrowd=0):
  return {"id": ann_id, "image_id": image_id, "category_id": category_id,
          "segmentation": segmentation, "iscrowd": iscrowd, "area": 0.0, "bbox": [0, 0, 1, 1]}


ANNOTATIONS = [
    # Image 1: a large person and a small dog inside it: the dog wins the overlap.
    _annotation(1, 1, 18, [_rectangle(6, 6, 10, 10)]),
    _annotation(2, 1, 1, [_rectangle(2, 2, 16, 14)]),
    # Image 2: a car (two polygons) over part of a crowd region: the car wins, the rest is 255.
    _annotation(3, 2, 3, [_rectangle(0, 0, 6, 4), _rectangle(4, 12, 10, 16)]),
    _annotation(4, 2, 1, _uncompressed_rle(_crowd_pixels()), iscrowd=1),
    # Image 3 has no annotation. Image 4: a toothbrush (category 90).
    _annotation(5, 4, 90, [_rectangle(1, 1, 3, 19)]),
    # Image 5: only a crowd region, so no foreground class.
    _annotation(6, 5, 1, _uncompressed_rle(_crowd_pixels()), iscrowd=1),
]


def _expected_masks():
  first = np.zeros((H, W), np.uint8)
  first[2:14, 2:16] = PERSON
  first[6:10, 6:10] = DOG
  second = np.zeros((H, W), np.uint8)
  second[_crowd_pixels()] = 255
  second[0:4, 0:6] = CAR
  second[12:16, 4:10] = CAR
  fourth = np.zeros((H, W), np.uint8)
  fourth[1:19, 1:3] = TOOTHBRUSH
  fifth = np.where(_crowd_pixels(), 255, 0).astype(np.uint8)
  return {1: first, 2: second, 4: fourth, 5: fifth}


def _file_stem(image_id):
  return f"COCO_{SPLIT}_{image_id:012d}"


def _make_coco(root, annotations=ANNOTATIONS):
  images = []
  for image_id in (1, 2, 3, 4, 5):
    image_dir = root / SPLIT
    image_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.full((H, W), 40 * image_id, np.uint8)  # Grayscale JPEG, as some COCO ones are.
    Image.fromarray(pixels).save(image_dir / f"{_file_stem(image_id)}.jpg", quality=95)
    images.append({"id": image_id, "file_name": f"{_file_stem(image_id)}.jpg", "height": H,
                   "width": W})
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  (root / "annotations" / f"instances_{SPLIT}.json").write_text(json.dumps(
      {"images": images, "annotations": annotations,
       "categories": [{"id": i, "name": n} for i, n in
                      zip(classes.COCO_CATEGORY_IDS, classes.COCO_CLASSES)]}))
  return root


def test_category_id_mapping():
  assert len(classes.COCO_CLASSES) == 80 and len(classes.COCO_CATEGORY_IDS) == 80
  assert len(set(classes.COCO_CATEGORY_IDS)) == 80
  assert set(range(1, 91)) - set(classes.COCO_CATEGORY_IDS) == {
      12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
  known = {1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 11: "fire hydrant",
           13: "stop sign", 18: "dog", 44: "bottle", 62: "chair", 67: "dining table",
           70: "toilet", 72: "tv", 90: "toothbrush"}
  for category_id, name in known.items():
    class_id = classes.COCO_CATEGORY_TO_CLASS_ID[category_id]
    assert classes.COCO_CLASSES[class_id - 1] == name
  assert sorted(classes.COCO_CATEGORY_TO_CLASS_ID.values()) == list(range(1, 81))
  assert classes.COCO_CATEGORY_TO_CLASS_ID[90] == 80 and classes.COCO_CATEGORY_TO_CLASS_ID[13] == 12


def _reference_polygon_pixels(polygon, height, width):
  """Ray casting at each pixel centre, one pixel at a time."""
  xs, ys = polygon[0::2], polygon[1::2]
  pixels = np.zeros((height, width), bool)
  for row in range(height):
    for col in range(width):
      px, py, inside = col + 0.5, row + 0.5, False
      for i in range(len(xs)):
        xa, ya, xb, yb = xs[i], ys[i], xs[i - 1], ys[i - 1]
        if (ya > py) != (yb > py) and px < xa + (py - ya) * (xb - xa) / (yb - ya):
          inside = not inside
      pixels[row, col] = inside
  return pixels


@pytest.mark.parametrize("polygon", [
    [2.3, 1.1, 21.7, 4.2, 12.0, 18.9],  # Triangle.
    [1.0, 1.0, 22.0, 1.0, 22.0, 18.0, 12.5, 6.5, 1.0, 18.0],  # Concave.
    [0.0, 0.0, 30.0, 0.0, 30.0, 25.0, 0.0, 25.0],  # Larger than the image.
    [-5.0, -3.0, 10.0, 4.0, 3.0, 25.0],  # Partly outside, left and top.
    [-9.0, -9.0, -2.0, -9.0, -2.0, -1.0],  # Entirely outside.
])
def test_rasterize_polygon_matches_ray_casting(polygon):
  np.testing.assert_array_equal(prepare_coco.rasterize_polygon(polygon, H, W),
                                _reference_polygon_pixels(polygon, H, W))


def test_uncompressed_rle_decodes_column_major():
  pixels = np.zeros((H, W), bool)
  pixels[3:7, 5] = pixels[0, 0] = pixels[H - 1, W - 1] = True
  decoded = prepare_coco.decode_uncompressed_rle(_uncompressed_rle(pixels), H, W)
  np.testing.assert_array_equal(decoded, pixels)
  with pytest.raises(ValueError, match="does not match"):
    prepare_coco.decode_uncompressed_rle(_uncompressed_rle(pixels), H, W + 1)


def test_prepare_and_source(tmp_path, caplog):
  root = _make_coco(tmp_path)
  with caplog.at_level(logging.WARNING):
    summary = prepare_coco.prepare_masks(root, SPLIT, rasterizer="numpy", num_threads=2)
  assert summary == {"written": 4, "skipped_unannotated": 1, "empty": 1}
  assert _file_stem(5) in caplog.text  # The crowd-only image is named.
  expected = _expected_masks()
  for image_id, mask in expected.items():
    written = Image.open(root / "masks" / SPLIT / f"{_file_stem(image_id)}.png")
    assert written.mode == "P"
    np.testing.assert_array_equal(np.asarray(written), mask)
  assert not (root / "masks" / SPLIT / f"{_file_stem(3)}.png").exists()

  # Image 5 (crowd only) has an empty tag list: a bad record, skipped here.
  source = coco.COCOSource(root, SPLIT, allow_subset=True, skip_bad_records=True)
  assert source.ids == [_file_stem(i) for i in (1, 2, 4, 5)]
  expected_tags = {1: {PERSON, DOG}, 2: {CAR}, 4: {TOOTHBRUSH}}
  for index, image_id in enumerate((1, 2, 4)):
    record = source[index]
    assert record["id"] == _file_stem(image_id)
    np.testing.assert_array_equal(record["mask"], expected[image_id])
    assert record["image"].shape == (H, W, 3) and record["image"].dtype == np.uint8
    assert np.abs(record["image"].astype(int) - 40 * image_id).max() <= 2
    np.testing.assert_array_equal(np.flatnonzero(record["labels"]) + 1,
                                  sorted(expected_tags[image_id]))
  assert source[3] is None and _file_stem(5) in str(list(source.bad_files.files()))

  strict = coco.COCOSource(root, SPLIT, allow_subset=True)
  with pytest.raises(records.BadRecordError, match=f"{_file_stem(5)}.png: empty tag list"):
    strict[3]


def test_source_errors(tmp_path, monkeypatch):
  root = _make_coco(tmp_path)
  with pytest.raises(FileNotFoundError, match="prepare_coco"):
    coco.COCOSource(root, SPLIT)
  prepare_coco.prepare_masks(root, SPLIT, rasterizer="numpy", num_threads=1)
  with pytest.raises(ValueError, match="found 4 images, expected 82081"):
    coco.COCOSource(root, SPLIT)
  monkeypatch.setitem(coco.EXPECTED_SPLIT_SIZES, SPLIT, 4)
  assert len(coco.COCOSource(root, SPLIT)) == 4
  (root / SPLIT / f"{_file_stem(2)}.jpg").unlink()
  with pytest.raises(records.BadRecordError, match=f"{_file_stem(2)}"):
    coco.COCOSource(root, SPLIT)
  source = coco.COCOSource(root, SPLIT, skip_bad_records=True)
  assert source[1] is None and _file_stem(2) in str(list(source.bad_files.files()))


def test_unknown_category_is_an_error(tmp_path):
  root = _make_coco(tmp_path, [_annotation(7, 1, 12, [_rectangle(0, 0, 2, 2)])])
  with pytest.raises(ValueError, match="Annotation 7 has unknown category_id 12"):
    prepare_coco.prepare_masks(root, SPLIT, rasterizer="numpy", num_threads=1)


@pytest.mark.skipif(importlib.util.find_spec("pycocotools") is not None,
                    reason="pycocotools is installed")
def test_pycocotools_rasterizer_without_pycocotools_is_a_clear_error(tmp_path):
  root = _make_coco(tmp_path)
  with pytest.raises(ImportError, match="--rasterizer=numpy"):
    prepare_coco.main([f"--root={root}", f"--split={SPLIT}"])
