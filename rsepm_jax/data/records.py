"""The shared dataset record: decoding, validation and bad-record handling (spec 7.3).

Every source returns `{"image": uint8 [H, W, 3] RGB, "mask": uint8 [H, W] (0 background,
255 ignore), "labels": float32 [C] multi-hot without background, "id": str}`.

A source reads the encoded files of a record (`EncodedRecord`) and `decode_record` turns them
into arrays, checking everything that can be wrong with real data: an unreadable or truncated
image, a colour or wrongly sized mask, mask values outside 0..C and 255, an empty tag list.
Each problem raises `BadRecordError` naming the file. `RecordSource` turns that error into a
skipped record (`None`, which grain treats as filtered out) when `skip_bad_records=True`.
"""
import dataclasses
import io
import threading

from absl import logging
from etils import epath
import numpy as np
from PIL import Image

IGNORE_INDEX = 255
_MAX_NAMED_FILES = 5  # How many missing files an error message names.

# What PIL raises on unreadable, truncated or absurd image files.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadRecordError(ValueError):
  """A record whose file `path` has `problem`."""

  def __init__(self, path, problem):
    super().__init__(f"{path}: {problem}")
    self.path = str(path)
    self.problem = problem


@dataclasses.dataclass(frozen=True)
class EncodedRecord:
  """A record's encoded files, as read by a source.

  Attributes:
    id: the image id (file stem).
    image_path: where `image_bytes` came from (named in errors).
    image_bytes: the encoded image file (JPEG or PNG), stored and decoded as is.
    mask_path: where `mask_bytes` came from, or None when the record has no mask.
    mask_bytes: the encoded class-index PNG, or None: the record gets an all-255 mask.
    labels: float32 [C] multi-hot, or None to take the tags from the mask.
    tags_path: the file the tags come from (named when the tag list is empty).
    expect_tags: False for unlabelled splits (VOC test), where an empty tag list is normal.
  """
  id: str
  image_path: str
  image_bytes: bytes
  mask_path: str | None
  mask_bytes: bytes | None
  labels: np.ndarray | None
  tags_path: str
  expect_tags: bool = True


def read_file_bytes(path):
  """The bytes of `path` (an `epath.Path`); a missing file is a `BadRecordError`."""
  try:
    return path.read_bytes()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
    raise BadRecordError(path, f"file not found ({type(error).__name__})") from error


def decode_image(data, path):
  """Encoded JPEG/PNG bytes -> uint8 [H, W, 3] RGB; grayscale, CMYK or RGBA become RGB."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # Decodes now, so truncated files fail here.
      if image.mode != "RGB":
        image = image.convert("RGB")
      array = np.asarray(image, np.uint8)
  except _PIL_ERRORS as error:
    raise BadRecordError(path, f"corrupt or truncated image ({error})") from error
  if array.size == 0:
    raise BadRecordError(path, f"empty image of shape {array.shape}")
  return array


def decode_mask(data, path, *, num_classes):
  """Class-index PNG bytes -> uint8 [H, W] with values in 0..num_classes or 255.

  Palette ('P') PNGs are read as their indices, never converted to colours; grayscale ('L')
  PNGs as their values. Colour masks are rejected: their values are colours, not classes.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      mode = image.mode
      values = np.asarray(image)
  except _PIL_ERRORS as error:
    raise BadRecordError(path, f"corrupt or truncated mask ({error})") from error
  if mode not in ("P", "L", "1", "I", "I;16"):
    raise BadRecordError(
        path, f"mask has PIL mode {mode!r}; expected a palette ('P') or grayscale ('L') PNG of "
        "class indices (a colour mask must be converted to indices first)")
  values = values.astype(np.int64)
  bad = (values < 0) | ((values > num_classes) & (values != IGNORE_INDEX))
  if bad.any():
    bad_values = np.unique(values[bad])
    raise BadRecordError(
        path, f"mask values {bad_values[:10].tolist()} outside the class range 0..{num_classes} "
        f"and ignore {IGNORE_INDEX} ({int(bad.sum())} pixels)")
  return values.astype(np.uint8)


def multi_hot(class_ids, num_classes):
  """Mask class ids (1..C) -> float32 [C] multi-hot (channel = class id - 1)."""
  labels = np.zeros(num_classes, np.float32)
  labels[np.asarray(list(class_ids), np.int64) - 1] = 1.0
  return labels


def labels_from_mask(mask, num_classes):
  """The classes present in `mask` (uint8 [H, W]) other than 0 and 255: float32 [C]."""
  present = np.unique(mask)
  return multi_hot(present[(present != 0) & (present != IGNORE_INDEX)], num_classes)


def decode_record(encoded, *, num_classes):
  """`EncodedRecord` -> the shared record dict; raises `BadRecordError` on bad data."""
  image = decode_image(encoded.image_bytes, encoded.image_path)
  if encoded.mask_bytes is None:
    mask = np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
  else:
    mask = decode_mask(encoded.mask_bytes, encoded.mask_path, num_classes=num_classes)
    if mask.shape != image.shape[:2]:
      raise BadRecordError(
          encoded.mask_path,
          f"mask size {mask.shape} differs from image size {image.shape[:2]} "
          f"({encoded.image_path})")
  if encoded.labels is None:
    labels = labels_from_mask(mask, num_classes)
  else:
    labels = np.asarray(encoded.labels, np.float32)
  if encoded.expect_tags and not labels.any():
    raise BadRecordError(encoded.tags_path, "empty tag list (no foreground class)")
  return {"image": image, "mask": mask, "labels": labels, "id": encoded.id}


def list_names(directory):
  """File names in `directory` (one listing call), or an empty set when it does not exist."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return frozenset()
  return frozenset(path.name for path in directory.iterdir())


def missing_files_message(what, missing, directory):
  """'3 <what> missing from <directory>: a, b, c' (the first few names)."""
  named = ", ".join(sorted(missing)[:_MAX_NAMED_FILES])
  more = ", ..." if len(missing) > _MAX_NAMED_FILES else ""
  return f"{len(missing)} {what} missing from {directory}: {named}{more}"


def config_field(data_config, name):
  """A required field of the `data` config, with an error naming it."""
  value = data_config.get(name)
  if value is None:
    raise ValueError(f"Config field data.{name} is required by this dataset source.")
  return value


def eval_splits(data_config):
  """The `data.eval_split` field (a name or a sequence of names) as a tuple."""
  splits = data_config.get("eval_split")
  if splits is None:
    return ()
  return (splits,) if isinstance(splits, str) else tuple(splits)


def check_split_size(description, found, expected, *, allow_subset):
  """Raises unless `found == expected` (a warning with `allow_subset`); `expected` may be None."""
  if expected is None:
    logging.info("%s: %d images (no expected count for this split).", description, found)
    return
  if found == expected:
    return
  message = f"{description}: found {found} images, expected {expected}."
  if not allow_subset:
    raise ValueError(
        f"{message} Set allow_subset=True (config field data.allow_subset) to use a partial "
        "dataset on purpose.")
  logging.warning("%s Continuing because allow_subset=True.", message)


class RecordSource:
  """Base grain random-access source with bad-record handling.

  Subclasses set `self.num_classes`, implement `__len__` and `read_encoded(index)`.
  `__getitem__` decodes it; with `skip_bad_records` a `BadRecordError` becomes `None`, a
  warning naming the file and the problem, and one more in `num_bad_records` (counted per
  process: each grain worker has its own copy of the source).
  """

  def __init__(self, *, skip_bad_records):
    self.skip_bad_records = skip_bad_records
    self.num_bad_records = 0
    self._count_lock = threading.Lock()

  def __len__(self):
    raise NotImplementedError

  def read_encoded(self, index):
    raise NotImplementedError

  def __getitem__(self, index):
    """Record `index` as the shared dict, or None for a skipped bad record."""
    return self._guarded(index, lambda: decode_record(
        self.read_encoded(index), num_classes=self.num_classes))

  def validated_encoded(self, index):
    """(`EncodedRecord`, decoded record) after validation, or None for a skipped bad record."""
    def read_and_validate():
      encoded = self.read_encoded(index)
      return encoded, decode_record(encoded, num_classes=self.num_classes)
    return self._guarded(index, read_and_validate)

  def report_missing_files(self, path, message):
    """Construction-time check: raise `BadRecordError(path, message)`, or warn when skipping."""
    if not self.skip_bad_records:
      raise BadRecordError(path, message)
    logging.warning("%s: %s; these records will be skipped (skip_bad_records=True).", path,
                    message)

  def _guarded(self, index, load):
    try:
      return load()
    except BadRecordError as error:
      if not self.skip_bad_records:
        raise
      with self._count_lock:
        self.num_bad_records += 1
        count = self.num_bad_records
      logging.warning("Skipping bad record %d of %r: %s [%d bad records so far]",
                      index, self, error, count)
      return None

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_count_lock"]  # Locks do not pickle; grain workers get a fresh one.
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._count_lock = threading.Lock()
