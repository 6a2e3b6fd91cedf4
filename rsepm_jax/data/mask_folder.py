"""Training masks read from a folder of class-index PNGs (`config.data.train_mask_dir`).

The multi-stage pipeline trains its segmentation network fully supervised on pseudo labels
(`--mode=export` writes them as `<dir>/<id>.png`, spec 9). `with_mask_folder(source, mask_dir)`
wraps a train source so that each record's `mask` is `<mask_dir>/<id>.png` instead of the data
set's ground truth; image and id are the source's, and so are the tags unless the source
takes them from the mask (then they come from the PNG, and may be empty). The PNGs are checked
as every mask is (`records.decode_mask`: palette or grayscale, values in 0..C or 255, the
image's size), and a missing or bad one is a `records.BadRecordError` naming the file: the
pre-flight check names every one of a VOC / COCO split before the first step (`preflight.py`),
and with `data.skip_bad_records` the record is skipped instead.
"""
import dataclasses

from etils import epath

from rsepm_jax.data import records


def _mask_path(mask_dir, image_id):
  return mask_dir / f"{image_id}.png"


class _FileSourceWithMaskFolder(records.FileRecordSource):
  """A `FileRecordSource` (VOC, COCO) whose records' mask files lie in `mask_dir`."""

  def __init__(self, source, mask_dir):
    super().__init__(skip_bad_records=source.skip_bad_records)
    self.num_classes = source.num_classes
    self._source = source
    self._mask_dir = mask_dir

  def __len__(self):
    return len(self._source)

  def record_files(self, index):
    files = self._source.record_files(index)
    # Tags that come from the mask come from this one; the supervised step reads none, so an
    # all-background pseudo label is a valid training mask.
    return dataclasses.replace(files, mask_path=_mask_path(self._mask_dir, files.id),
                               expect_tags=False)

  def __repr__(self):
    return f"{self._source!r} with masks from {str(self._mask_dir)!r}"


class _EncodedSourceWithMaskFolder(records.RecordSource):
  """A `RecordSource` of stored records (ArrayRecord) whose masks are read from `mask_dir`."""

  def __init__(self, source, mask_dir):
    super().__init__(skip_bad_records=source.skip_bad_records)
    self.num_classes = source.num_classes
    self._source = source
    self._mask_dir = mask_dir

  def __len__(self):
    return len(self._source)

  def read_encoded(self, index):
    encoded = self._source.read_encoded(index)
    path = _mask_path(self._mask_dir, encoded.id)
    return dataclasses.replace(encoded, mask_path=str(path),
                               mask_bytes=records.read_file_bytes(path), expect_tags=False)

  def __repr__(self):
    return f"{self._source!r} with masks from {str(self._mask_dir)!r}"


class _GeneratedSourceWithMaskFolder:
  """A source of decoded records (synthetic) whose masks are read from `mask_dir`."""

  def __init__(self, source, mask_dir):
    self.num_classes = source.num_classes
    self._source = source
    self._mask_dir = mask_dir

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    path = _mask_path(self._mask_dir, record["id"])
    mask = records.decode_mask(records.read_file_bytes(path), path, num_classes=self.num_classes)
    if mask.shape != record["image"].shape[:2]:
      raise records.BadRecordError(
          path, f"mask size {mask.shape} differs from the size {record['image'].shape[:2]} of "
          f"image {record['id']!r}")
    return {**record, "mask": mask}

  def __repr__(self):
    return f"{self._source!r} with masks from {str(self._mask_dir)!r}"


def with_mask_folder(source, mask_dir):
  """`source` with each record's mask read from `<mask_dir>/<record id>.png`.

  Raises `NotADirectoryError` when `mask_dir` is not a folder.
  """
  mask_dir = epath.Path(mask_dir)
  if not mask_dir.is_dir():
    raise NotADirectoryError(
        f"config.data.train_mask_dir={str(mask_dir)!r} is not a folder; expected the folder of "
        "<id>.png training masks (e.g. the pseudo labels of --mode=export, "
        "<workdir>/pseudo_labels/<split>).")
  if isinstance(source, records.FileRecordSource):
    return _FileSourceWithMaskFolder(source, mask_dir)
  if isinstance(source, records.RecordSource):
    return _EncodedSourceWithMaskFolder(source, mask_dir)
  return _GeneratedSourceWithMaskFolder(source, mask_dir)
