"""Tests for rsepm_jax.data.voc / records / classes on tiny real-file VOC trees."""
import logging

import ml_collections
import numpy as np
from PIL import Image
import pytest

from rsepm_jax.data import classes
from rsepm_jax.data import records
from rsepm_jax.data import voc

H, W = 24, 32
PERSON, DOG, CAT, BIRD, CAR, AEROPLANE = (classes.VOC_CLASSES.index(name) + 1 for name in (
    "person", "dog", "cat", "bird", "car", "aeroplane"))


def _smooth_image(seed):
  """A smooth colour image whose channels differ (JPEG keeps it within a few levels)."""
  y, x = np.mgrid[0:H, 0:W]
  return np.stack([x * 255 // W, y * 255 // H, np.full_like(x, 40 + 60 * seed)], -1).astype(
      np.uint8)


def _write_jpeg(path, array, mode=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(array)
  if mode is not None:
    image = image.convert(mode)
  image.save(path, format="JPEG", quality=95)


def _write_palette_png(path, mask):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(mask)
  image.putpalette(classes.color_palette().reshape(-1).tolist())
  image.save(path)
  assert Image.open(path).mode == "P"


def _mask_with_border(class_id):
  """Background with a class_id block and a 255 void border, like VOC SegmentationClass."""
  mask = np.zeros((H, W), np.uint8)
  mask[6:18, 8:20] = class_id
  mask[5, 7:21] = mask[18, 7:21] = mask[5:19, 7] = mask[5:19, 20] = 255
  return mask


def _object(name, box, difficult=0, part=None):
  part_xml = f"<part><name>{part}</name></part>" if part else ""
  xmin, ymin, xmax, ymax = box
  return (f"<object><name>{name}</name><difficult>{difficult}</difficult>{part_xml}"
          f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
          "</bndbox></object>")


def _write_xml(path, objects):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"<annotation><size><width>{W}</width><height>{H}</height><depth>3</depth>"
                  f"</size>{''.join(objects)}</annotation>")


# id -> (image, mask or None, XML objects or None). Tags expected: see test_vocdevkit_records.
RECORDS = {
    # Difficult dog counts; the zero-width cat and the bird whose box clamps to zero width do not;
    # the person's <part> name is not an object.
    "2007_000001": (_smooth_image(0), _mask_with_border(PERSON),
                    [_object("person", (2, 2, 20, 20), part="head"),
                     _object("dog", (1, 1, 9, 9), difficult=1),
                     _object("cat", (5, 5, 5, 9)),
                     _object("bird", (W + 3, 1, W + 9, 9))]),
    # No XML: tags come from the mask (car; 0 and 255 are not tags).
    "2007_000002": (_smooth_image(1), _mask_with_border(CAR), None),
    # Grayscale JPEG with an XML and no mask.
    "2007_000003": (_smooth_image(2)[..., 0], None, [_object("aeroplane", (0, 0, 10, 10))]),
}
EXPECTED_LABELS = {"2007_000001": {PERSON, DOG}, "2007_000002": {CAR},
                   "2007_000003": {AEROPLANE}}


def _make_vocdevkit(root, records_by_id, split="train", mask_dir="SegmentationClass"):
  for image_id, (image, mask, objects) in records_by_id.items():
    _write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", image)
    if mask is not None:
      _write_palette_png(root / mask_dir / f"{image_id}.png", mask)
    if objects is not None:
      _write_xml(root / "Annotations" / f"{image_id}.xml", objects)
  list_dir = root / "ImageSets" / "Segmentation"
  list_dir.mkdir(parents=True, exist_ok=True)
  (list_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in records_by_id))
  return root


def _make_rsepm(root, records_by_id, split="train"):
  for image_id, (image, mask, objects) in records_by_id.items():
    _write_jpeg(root / split / "image" / f"{image_id}.jpg", image)
    if mask is not None:
      _write_palette_png(root / split / "mask" / f"{image_id}.png", mask)
    if objects is not None:
      _write_xml(root / split / "xml" / f"{image_id}.xml", objects)
  return root


def _check_records(source, records_by_id):
  assert len(source) == len(records_by_id)
  for index, (image_id, (image, mask, _)) in enumerate(records_by_id.items()):
    record = source[index]
    assert record["id"] == image_id
    assert record["image"].dtype == np.uint8 and record["image"].shape == (H, W, 3)
    expected_rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, -1)
    assert np.abs(record["image"].astype(int) - expected_rgb).mean() < 3  # JPEG, RGB order.
    expected_mask = mask if mask is not None else np.full((H, W), 255, np.uint8)
    np.testing.assert_array_equal(record["mask"], expected_mask)
    assert record["mask"].dtype == np.uint8
    expected_labels = np.zeros(20, np.float32)
    expected_labels[[c - 1 for c in EXPECTED_LABELS[image_id]]] = 1
    np.testing.assert_array_equal(record["labels"], expected_labels)
    assert record["labels"].dtype == np.float32


@pytest.mark.parametrize("layout", ["vocdevkit", "rsepm"])
def test_records_in_both_layouts(tmp_path, layout):
  if layout == "vocdevkit":
    root = _make_vocdevkit(tmp_path, RECORDS)
    source = voc.VOCSource(root, "train", mask_dir="SegmentationClass", allow_subset=True)
  else:
    root = _make_rsepm(tmp_path, RECORDS)
    source = voc.VOCSource(root, "train", allow_subset=True)
  assert source.layout == layout
  _check_records(source, RECORDS)


def test_vocdevkit_list_order_and_deeplab_lines(tmp_path):
  root = _make_vocdevkit(tmp_path, RECORDS)
  (root / "ImageSets" / "Segmentation" / "train.txt").write_text(
      "/JPEGImages/2007_000003.jpg /SegmentationClass/2007_000003.png\n\n2007_000001\n")
  source = voc.VOCSource(root, "train", mask_dir="SegmentationClass", allow_subset=True)
  assert source.ids == ["2007_000003", "2007_000001"]


def test_training_without_masks_gives_ignore_masks(tmp_path):
  with_xml = {k: v for k, v in RECORDS.items() if v[2] is not None}
  root = _make_vocdevkit(tmp_path, with_xml, split="train_aug")
  source = voc.VOCSource(root, "train_aug", allow_subset=True)  # No SegmentationClassAug.
  for index in range(len(source)):
    record = source[index]
    assert (record["mask"] == 255).all() and record["mask"].shape == (H, W)
    assert record["labels"].any()


def test_eval_without_mask_dir_is_a_clear_error(tmp_path):
  root = _make_vocdevkit(tmp_path, RECORDS, split="val")
  with pytest.raises(FileNotFoundError, match="SegmentationClassAug"):
    voc.VOCSource(root, "val", require_masks=True, allow_subset=True)


def test_from_config_requires_masks_for_eval_splits(tmp_path):
  root = _make_vocdevkit(tmp_path, RECORDS, split="val")
  config = ml_collections.ConfigDict(
      {"root": str(root), "eval_split": "val", "allow_subset": True})
  with pytest.raises(FileNotFoundError, match="needs masks"):
    voc.from_config(config, "val")
  config.mask_dir = "SegmentationClass"
  with pytest.raises(records.BadRecordError, match="2007_000003"):  # The one without a mask.
    voc.from_config(config, "val")


def test_unknown_layout_names_root_and_what_was_looked_for(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    voc.VOCSource(tmp_path, "train")
  message = str(error.value)
  assert str(tmp_path) in message and "JPEGImages" in message
  assert "ImageSets/Segmentation/train.txt" in message and "train/image" in message


def test_split_size_mismatch(tmp_path, caplog):
  root = _make_vocdevkit(tmp_path, RECORDS)
  with pytest.raises(ValueError, match=r"found 3 images, expected 1464"):
    voc.VOCSource(root, "train", mask_dir="SegmentationClass")
  with caplog.at_level(logging.WARNING):
    source = voc.VOCSource(root, "train", mask_dir="SegmentationClass", allow_subset=True)
  assert len(source) == 3
  assert "found 3 images, expected 1464" in caplog.text


def test_split_size_match_passes(tmp_path, monkeypatch):
  monkeypatch.setitem(voc.EXPECTED_SPLIT_SIZES, "train", 3)
  root = _make_vocdevkit(tmp_path, RECORDS)
  assert len(voc.VOCSource(root, "train", mask_dir="SegmentationClass")) == 3


def test_cmyk_jpeg_becomes_rgb(tmp_path):
  cyan = np.zeros((H, W, 3), np.uint8)
  cyan[..., 1:] = 255
  _write_jpeg(tmp_path / "JPEGImages" / "a.jpg", cyan, mode="CMYK")
  assert Image.open(tmp_path / "JPEGImages" / "a.jpg").mode == "CMYK"
  image = records.decode_image((tmp_path / "JPEGImages" / "a.jpg").read_bytes(), "a.jpg")
  assert image.shape == (H, W, 3)
  assert np.abs(image.astype(int) - cyan).max() <= 8


def test_color_palette_matches_bitwise_definition():
  palette = classes.color_palette()
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  for index in range(256):  # Reference: one bit at a time.
    rgb = [0, 0, 0]
    value = index
    for shift in range(7, -1, -1):
      for channel in range(3):
        rgb[channel] |= ((value >> channel) & 1) << shift
      value >>= 3
    assert tuple(palette[index]) == tuple(rgb), index
  # VOC legend colours: background, aeroplane, bicycle, person, void.
  assert palette[[0, 1, 2, 15, 255]].tolist() == [
      [0, 0, 0], [128, 0, 0], [0, 128, 0], [192, 128, 128], [224, 224, 192]]


def test_voc_class_names():
  assert len(classes.VOC_CLASSES) == 20
  assert classes.VOC_CLASSES[0] == "aeroplane" and classes.VOC_CLASSES[-1] == "tvmonitor"
  assert classes.VOC_CLASSES[14] == "person"


# Bad data: each case makes a tree of one good and one bad record ("2007_000009").
def _truncated(root):
  path = root / "JPEGImages" / "2007_000009.jpg"
  path.write_bytes(path.read_bytes()[:300])
  return "2007_000009.jpg", "truncated"


def _corrupt(root):
  (root / "JPEGImages" / "2007_000009.jpg").write_bytes(b"this is not a JPEG" * 20)
  return "2007_000009.jpg", "corrupt"


def _missing_mask(root):
  (root / "SegmentationClass" / "2007_000009.png").unlink()
  return "2007_000009", "missing"


def _empty_tags(root):
  _write_xml(root / "Annotations" / "2007_000009.xml", [_object("cat", (4, 4, 4, 9))])
  return "2007_000009.xml", "empty tag list"


def _mask_value_out_of_range(root):
  mask = _mask_with_border(PERSON)
  mask[0, 0] = 21
  mask[0, 1] = 200
  _write_palette_png(root / "SegmentationClass" / "2007_000009.png", mask)
  return "2007_000009.png", "[21, 200]"


def _mask_wrong_size(root):
  _write_palette_png(root / "SegmentationClass" / "2007_000009.png",
                     np.zeros((H, W + 1), np.uint8))
  return "2007_000009.png", "mask size"


def _listed_image_missing(root):
  (root / "JPEGImages" / "2007_000009.jpg").unlink()
  return "2007_000009", "missing"


def _unknown_object_name(root):
  _write_xml(root / "Annotations" / "2007_000009.xml", [_object("motorcycle", (1, 1, 9, 9))])
  return "2007_000009.xml", "'motorcycle' is not one of the 20 classes"


BAD_CASES = [_truncated, _corrupt, _missing_mask, _empty_tags, _mask_value_out_of_range,
             _mask_wrong_size, _listed_image_missing, _unknown_object_name]


def _bad_tree(root, make_bad):
  good = {"2007_000001": RECORDS["2007_000001"]}
  bad = {"2007_000009": (_smooth_image(3), _mask_with_border(DOG), [_object("dog", (1, 1, 9, 9))])}
  _make_vocdevkit(root, {**good, **bad}, split="val")
  return make_bad(root)


def _load_all(**kwargs):
  source = voc.VOCSource(mask_dir="SegmentationClass", require_masks=True, allow_subset=True,
                         **kwargs)
  return source, [source[index] for index in range(len(source))]


@pytest.mark.parametrize("make_bad", BAD_CASES, ids=lambda f: f.__name__.strip("_"))
def test_bad_record_raises_naming_the_file(tmp_path, make_bad):
  file_name, problem = _bad_tree(tmp_path, make_bad)
  with pytest.raises(records.BadRecordError) as error:
    _load_all(root=tmp_path, split="val")
  assert file_name in str(error.value) and problem in str(error.value)


@pytest.mark.parametrize("make_bad", BAD_CASES, ids=lambda f: f.__name__.strip("_"))
def test_bad_record_skipped_and_counted_once(tmp_path, make_bad, caplog):
  file_name, problem = _bad_tree(tmp_path, make_bad)

  @records.logs_bad_files
  def run():
    source, loaded = _load_all(root=tmp_path, split="val", skip_bad_records=True)
    read_again = [source[1] for _ in range(3)]
    return loaded, read_again, source.bad_files.files()

  with caplog.at_level(logging.WARNING):
    loaded, read_again, bad_files = run()
  assert loaded[0]["id"] == "2007_000001" and loaded[1] is None and read_again == [None] * 3
  assert len(bad_files) == 1 and file_name in next(iter(bad_files))
  skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping")]
  assert len(skipped) == 1 and file_name in skipped[0] and problem in skipped[0]
  summary = caplog.records[-1].getMessage()
  assert summary.startswith("1 bad file skipped") and file_name in summary and problem in summary


def test_parse_xml_tags_keeps_difficult_and_drops_degenerate_boxes():
  xml = (f"<annotation><size><width>{W}</width><height>{H}</height></size>"
         + _object("dog", (3.7, 2, 3.2, 8))  # Truncates to zero width.
         + _object("horse", (0, H + 5, 5, H + 9))  # Clamps to zero height.
         + _object("sheep", (1, 1, 2, 2), difficult=1) + "</annotation>").encode()
  assert voc.parse_xml_tags(xml, "a.xml") == [classes.VOC_CLASSES.index("sheep") + 1]
