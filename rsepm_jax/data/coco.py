"""MS COCO 2014 for WSSS as a grain random-access source (spec 7.3, data_and_users.md 6.2).

Layout: `root/<split>/<name>.jpg` (split `train2014` or `val2014`) and class-index PNG masks
`root/<mask_dir>/<split>/<name>.png` (values 0..80, 255 ignore), as written by
`python -m rsepm_jax.data.prepare_coco` (`mask_dir="masks"`) or downloaded (ToCo's tarball
uses `mask_dir="SegmentationClass"`). The list is the sorted mask directory: images without
annotations have no mask and are not part of the split. Tags are the classes present in the
mask. A mask whose image is missing is a bad record (`records.py`), found at construction from
one listing of each directory.
"""
from absl import logging
from etils import epath

from rsepm_jax.data import classes
from rsepm_jax.data import records

# Images with at least one annotation (data_and_users.md 6.2).
EXPECTED_SPLIT_SIZES = {"train2014": 82081, "val2014": 40137}


class COCOSource(records.FileRecordSource):
  """A COCO 2014 split as records.

  Attributes:
    ids: image file stems (e.g. "COCO_val2014_000000000042") in sorted order.
    num_classes: 80.
    bad_files: the run's `records.BadFileLog` (files skipped with `skip_bad_records`).
  """

  def __init__(self, root, split, *, mask_dir="masks", skip_bad_records=False,
               allow_subset=False):
    super().__init__(skip_bad_records=skip_bad_records)
    root = epath.Path(root)
    self.split = split
    self.num_classes = len(classes.COCO_CLASSES)
    self._image_dir = root / split
    self._mask_dir = root / mask_dir / split
    if not self._mask_dir.is_dir():
      raise FileNotFoundError(
          f"No COCO masks for split {split!r}: {self._mask_dir} does not exist. Write them with "
          f"`python -m rsepm_jax.data.prepare_coco --root={root} --split={split}` or set "
          "data.mask_dir to the directory that holds <split>/*.png.")
    if not self._image_dir.is_dir():
      raise FileNotFoundError(f"No COCO images for split {split!r}: {self._image_dir} "
                              "does not exist.")
    self.ids = sorted(name[:-4] for name in records.list_names(self._mask_dir)
                      if name.endswith(".png"))
    logging.info("COCO split %r: %d masks in %s, images in %s.", split, len(self.ids),
                 self._mask_dir, self._image_dir)
    records.check_split_size(f"COCO split {split!r} ({self._mask_dir})", len(self.ids),
                             EXPECTED_SPLIT_SIZES.get(split), allow_subset=allow_subset)
    image_names = records.list_names(self._image_dir)
    self._missing_images = frozenset(
        image_id for image_id in self.ids if f"{image_id}.jpg" not in image_names)
    if self._missing_images:
      self.report_missing_files(self._mask_dir, records.missing_files_message(
          "images of masks are", self._missing_images, self._image_dir))

  def record_files(self, index):
    """Where record `index` is (`records.RecordFiles`); its tags come from the mask."""
    image_id = self.ids[index]
    image_path = self._image_dir / f"{image_id}.jpg"
    mask_path = self._mask_dir / f"{image_id}.png"
    if image_id in self._missing_images:
      raise records.BadRecordError(image_path, f"image of mask {mask_path} is missing")
    return records.RecordFiles(id=image_id, image_path=image_path, mask_path=mask_path,
                               labels=None, tags_path=str(mask_path))

  def __len__(self):
    return len(self.ids)

  def __repr__(self):
    return (f"COCOSource(split={self.split!r}, masks={str(self._mask_dir)!r}, "
            f"num_records={len(self)})")


def from_config(data_config, split):
  """`COCOSource` for `split` from the `data` config."""
  return COCOSource(
      records.config_field(data_config, "root"), split,
      mask_dir=data_config.get("mask_dir", "masks"),
      skip_bad_records=data_config.get("skip_bad_records", False),
      allow_subset=data_config.get("allow_subset", False))
