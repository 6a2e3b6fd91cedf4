"""PASCAL VOC 2012 (+ SBD "train_aug") as a grain random-access source (spec 7.3).

Two directory layouts, detected per split (the choice is logged):
* VOCdevkit: `root/JPEGImages/<id>.jpg`, `root/<mask_dir>/<id>.png` (`SegmentationClassAug`
  for the SBD-augmented masks, or `SegmentationClass`), `root/Annotations/<id>.xml`, and the
  list `root/ImageSets/Segmentation/<split>.txt` (its order is the source order; a line may also
  be a DeepLab-style "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png" pair). Put the
  `train_aug.txt` that WSSS repositories ship there too.
* RS+EPM: `root/<split>/image/<id>.jpg`, `root/<split>/mask/<id>.png`, `root/<split>/xml/<id>.xml`;
  the list is the sorted image directory (`mask_dir` is not used).

Image-level tags are the XML object names, difficult objects included, skipping objects whose
box has zero width or height after truncation to integers and clamping to the image (spec 7.3);
without an XML they are the classes present in the mask. Masks are palette PNGs read as indices.
A missing mask is an all-255 (ignore) mask unless `require_masks`, so training needs only the
JPEGs, the XMLs and the list file; evaluation needs masks.

Bad data (see `records.py`) raises `BadRecordError` naming the file, or is skipped with
`skip_bad_records`. Listed images and (when required) masks are checked against one listing of
each directory at construction, which is cheap on gs:// too: with `skip_bad_records` the missing
ones are kept in the list and return None from `__getitem__`.
"""
import xml.etree.ElementTree as ElementTree

from absl import logging
from etils import epath
import numpy as np

from rsepm_jax.data import classes
from rsepm_jax.data import records

# Images per split (data_and_users.md 6.1); "validation" is the RS+EPM name of "val".
EXPECTED_SPLIT_SIZES = {
    "train_aug": 10582, "train": 1464, "val": 1449, "validation": 1449, "test": 1456,
}
# Splits without labels: records get zero labels and, unless a mask exists, an all-255 mask.
UNLABELLED_SPLITS = ("test",)


def parse_xml_tags(data, path, class_names=classes.VOC_CLASSES):
  """VOC XML bytes -> sorted mask class ids (1..C) of its objects (spec 7.3).

  Difficult objects count. An object is skipped when its box, truncated to integers and
  clamped to [0, size - 1], has zero width or height. Object names outside `class_names` are
  an error (a misspelt class must not vanish silently); part names are not objects.
  """
  try:
    annotation = ElementTree.fromstring(data)
  except ElementTree.ParseError as error:
    raise records.BadRecordError(path, f"unparsable XML ({error})") from error
  class_index = {name: index for index, name in enumerate(class_names)}
  width = _xml_int(annotation, "size/width", path)
  height = _xml_int(annotation, "size/height", path)
  class_ids = set()
  for obj in annotation.findall("object"):
    name = (obj.findtext("name") or "").strip()
    if name not in class_index:
      raise records.BadRecordError(
          path, f"object name {name!r} is not one of the {len(class_names)} classes")
    box = obj.find("bndbox")
    if box is not None:
      xmin, xmax = (_box_coordinate(box, key, width, path) for key in ("xmin", "xmax"))
      ymin, ymax = (_box_coordinate(box, key, height, path) for key in ("ymin", "ymax"))
      if xmax - xmin == 0 or ymax - ymin == 0:
        continue
    class_ids.add(class_index[name] + 1)
  return sorted(class_ids)


def _xml_int(element, key, path):
  """Integer value of `element/key` ("273.5" -> 273), or None when absent."""
  text = element.findtext(key)
  if text is None:
    return None
  try:
    return int(float(text))
  except ValueError as error:
    raise records.BadRecordError(path, f"<{key}> is not a number: {text!r}") from error


def _box_coordinate(box, key, size, path):
  """Box coordinate `key` clamped to [0, size - 1] (unclamped when the XML has no size)."""
  value = _xml_int(box, key, path)
  if value is None:
    raise records.BadRecordError(path, f"object box has no <{key}>")
  return value if size is None else max(0, min(value, size - 1))


def _read_list_file(path):
  """Ids of a VOC list file: first token of each non-empty line, reduced to its file stem."""
  try:
    text = path.read_text()
  except FileNotFoundError as error:
    raise FileNotFoundError(f"List file {path} not found.") from error
  return [epath.Path(line.split()[0]).stem for line in text.splitlines() if line.strip()]


class VOCSource(records.FileRecordSource):
  """PASCAL VOC 2012 segmentation split as records (module docstring has the rules).

  Attributes:
    ids: image ids in source order.
    layout: "vocdevkit" or "rsepm".
    num_classes: 20.
    bad_files: the run's `records.BadFileLog` (files skipped with `skip_bad_records`).
  """

  def __init__(self, root, split, *, mask_dir="SegmentationClassAug", require_masks=False,
               skip_bad_records=False, allow_subset=False):
    super().__init__(skip_bad_records=skip_bad_records)
    root = epath.Path(root)
    self.split = split
    self.num_classes = len(classes.VOC_CLASSES)
    self.require_masks = require_masks
    self.unlabelled = split in UNLABELLED_SPLITS
    rsepm_image_dir = root / split / "image"
    list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if rsepm_image_dir.is_dir():
      self.layout = "rsepm"
      self._image_dir = rsepm_image_dir
      self._mask_dir = root / split / "mask"
      self._xml_dir = root / split / "xml"
      self._list_source = str(rsepm_image_dir)
      image_names = records.list_names(self._image_dir)
      self.ids = sorted(name[:-4] for name in image_names if name.endswith(".jpg"))
    elif (root / "JPEGImages").is_dir() and list_path.exists():
      self.layout = "vocdevkit"
      self._image_dir = root / "JPEGImages"
      self._mask_dir = root / mask_dir
      self._xml_dir = root / "Annotations"
      self._list_source = str(list_path)
      image_names = records.list_names(self._image_dir)
      self.ids = _read_list_file(list_path)
    else:
      raise FileNotFoundError(
          f"No VOC data for split {split!r} under {root}: looked for the VOCdevkit layout "
          f"({root / 'JPEGImages'}/ and {list_path}) and the RS+EPM layout ({rsepm_image_dir}/).")
    self._mask_names = records.list_names(self._mask_dir)
    self._xml_names = records.list_names(self._xml_dir)
    num_masks = sum(f"{image_id}.png" in self._mask_names for image_id in self.ids)
    num_xmls = sum(f"{image_id}.xml" in self._xml_names for image_id in self.ids)
    logging.info("VOC split %r: %s layout at %s; %d images listed in %s, %d with masks in %s, "
                 "%d with XML in %s.", split, self.layout, root, len(self.ids),
                 self._list_source, num_masks, self._mask_dir, num_xmls, self._xml_dir)
    records.check_split_size(f"VOC split {split!r} ({self._list_source})", len(self.ids),
                             EXPECTED_SPLIT_SIZES.get(split), allow_subset=allow_subset)

    self._missing_images = frozenset(
        image_id for image_id in self.ids if f"{image_id}.jpg" not in image_names)
    if self._missing_images:
      self.report_missing_files(self._list_source, records.missing_files_message(
          "listed images are", self._missing_images, self._image_dir))
    if require_masks:
      if not self._mask_dir.is_dir():
        raise FileNotFoundError(
            f"VOC split {split!r} needs masks (evaluation split) but the mask directory "
            f"{self._mask_dir} does not exist. Point data.mask_dir at SegmentationClassAug "
            "(SBD masks) or SegmentationClass (VOC masks).")
      missing_masks = [image_id for image_id in self.ids
                       if f"{image_id}.png" not in self._mask_names]
      if missing_masks:
        self.report_missing_files(str(self._mask_dir), records.missing_files_message(
            "required masks are", missing_masks, self._mask_dir))

  def record_files(self, index):
    """Where record `index` is, with its tags (`records.RecordFiles`); reads only the XML."""
    image_id = self.ids[index]
    image_path = self._image_dir / f"{image_id}.jpg"
    if image_id in self._missing_images:
      raise records.BadRecordError(
          image_path, f"image listed in {self._list_source} is missing")
    mask_path = self._mask_dir / f"{image_id}.png"
    has_mask = f"{image_id}.png" in self._mask_names
    if not has_mask and self.require_masks:
      raise records.BadRecordError(mask_path, "missing mask (required for this split)")
    xml_path = self._xml_dir / f"{image_id}.xml"
    if self.unlabelled:
      labels, tags_path = np.zeros(self.num_classes, np.float32), image_path
    elif f"{image_id}.xml" in self._xml_names:
      class_ids = parse_xml_tags(records.read_file_bytes(xml_path), xml_path)
      labels, tags_path = records.multi_hot(class_ids, self.num_classes), xml_path
    elif has_mask:
      labels, tags_path = None, mask_path
    else:
      raise records.BadRecordError(
          xml_path, f"no XML annotation and no mask ({mask_path}) to read the tags from")
    return records.RecordFiles(
        id=image_id, image_path=image_path, mask_path=mask_path if has_mask else None,
        labels=labels, tags_path=str(tags_path), expect_tags=not self.unlabelled)

  def __len__(self):
    return len(self.ids)

  def __repr__(self):
    return (f"VOCSource(split={self.split!r}, layout={self.layout!r}, "
            f"images={self._list_source!r}, num_records={len(self)})")


def from_config(data_config, split):
  """`VOCSource` for `split` from the `data` config (masks required for its eval splits)."""
  return VOCSource(
      records.config_field(data_config, "root"), split,
      mask_dir=data_config.get("mask_dir", "SegmentationClassAug"),
      require_masks=split in records.eval_splits(data_config),
      skip_bad_records=data_config.get("skip_bad_records", False),
      allow_subset=data_config.get("allow_subset", False))
