"""The shared dataset record: decoding, validation and bad-record handling (spec 7.3).

Every source returns `{"image": uint8 [H, W, 3] RGB, "mask": uint8 [H, W] (0 background,
255 ignore), "labels": float32 [C] multi-hot without background, "id": str}`.

A source reads the encoded files of a record (`EncodedRecord`) and `decode_record` turns them
into arrays, checking everything that can be wrong with real data: an unreadable or truncated
image, a colour or wrongly sized mask, mask values outside 0..C and 255, an empty tag list.
Each problem raises `BadRecordError` naming the file. `RecordSource` turns that error into a
skipped record (`None`, which grain treats as filtered out) when `skip_bad_records=True`, and
counts it in the run's `BadFileLog`: each bad file is warned about and counted once, whichever
process (grain worker or not) reads it first. `check_record_files` is the pre-flight form of
the same checks (headers and masks, no image decode) for sources of files (`FileRecordSource`).
"""
import atexit
import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile

from absl import logging
from etils import epath
import numpy as np
from PIL import Image

IGNORE_INDEX = 255
_MAX_NAMED_FILES = 5  # How many missing files an error message names.
_MAX_SUMMARY_FILES = 20  # How many bad files the end-of-run summary names.

# What PIL raises on unreadable, truncated or absurd image files.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadRecordError(ValueError):
  """A record whose file `path` has `problem`."""

  def __init__(self, path, problem):
    super().__init__(f"{path}: {problem}")
    self.path = str(path)
    self.problem = problem

  def __reduce__(self):
    # grain workers pickle exceptions back to the main process; the default reduction would
    # call __init__ with the message alone.
    return type(self), (self.path, self.problem)


@dataclasses.dataclass(frozen=True)
class EncodedRecord:
  """A record's encoded files, as read by a source.

  Attributes:
    id: the image id (file stem).
    image_path: where `image_bytes` came from (named in errors).
    image_bytes: the encoded image file (JPEG or PNG), stored and decoded as is; None when
      only the headers are checked (`check_record_files`).
    mask_path: where `mask_bytes` came from, or None when the record has no mask.
    mask_bytes: the encoded class-index PNG, or None: the record gets an all-255 mask.
    labels: float32 [C] multi-hot, or None to take the tags from the mask.
    tags_path: the file the tags come from (named when the tag list is empty).
    expect_tags: False for unlabelled splits (VOC test), where an empty tag list is normal.
  """
  id: str
  image_path: str
  image_bytes: bytes | None
  mask_path: str | None
  mask_bytes: bytes | None
  labels: np.ndarray | None
  tags_path: str
  expect_tags: bool = True


@dataclasses.dataclass(frozen=True)
class RecordFiles:
  """Where a record of a `FileRecordSource` is, before anything but its tags is read.

  Attributes:
    id: the image id (file stem).
    image_path: `epath.Path` of the encoded image.
    mask_path: `epath.Path` of the class-index PNG, or None: the record gets an all-255 mask.
    labels: float32 [C] multi-hot (read from an XML), or None to take the tags from the mask.
    tags_path: the file the tags come from (named when the tag list is empty).
    expect_tags: False for unlabelled splits, where an empty tag list is normal.
  """
  id: str
  image_path: epath.Path
  mask_path: epath.Path | None
  labels: np.ndarray | None
  tags_path: str
  expect_tags: bool = True

  def read(self, with_image=True):
    """The `EncodedRecord` of these files (without the image bytes if not `with_image`)."""
    return EncodedRecord(
        id=self.id, image_path=str(self.image_path),
        image_bytes=read_file_bytes(self.image_path) if with_image else None,
        mask_path=None if self.mask_path is None else str(self.mask_path),
        mask_bytes=None if self.mask_path is None else read_file_bytes(self.mask_path),
        labels=self.labels, tags_path=self.tags_path, expect_tags=self.expect_tags)


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
    raise BadRecordError(path, f"corrupt or truncated image ({_pil_problem(error)})") from error
  if array.size == 0:
    raise BadRecordError(path, f"empty image of shape {array.shape}")
  return array


def _pil_problem(error):
  """What PIL's `error` says, without the file object's repr it puts in 'cannot identify'."""
  if isinstance(error, Image.UnidentifiedImageError):
    return "not a format PIL recognises"
  return str(error)


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
    raise BadRecordError(path, f"corrupt or truncated mask ({_pil_problem(error)})") from error
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
  mask, labels = _mask_and_labels(encoded, image.shape[:2], num_classes=num_classes)
  return {"image": image, "mask": mask, "labels": labels, "id": encoded.id}


def _mask_and_labels(encoded, image_size, *, num_classes):
  """(uint8 [H, W] mask, float32 [C] labels) of `encoded` for an image of `image_size` (H, W)."""
  if encoded.mask_bytes is None:
    mask = np.full(image_size, IGNORE_INDEX, np.uint8)
  else:
    mask = decode_mask(encoded.mask_bytes, encoded.mask_path, num_classes=num_classes)
    if mask.shape != tuple(image_size):
      raise BadRecordError(
          encoded.mask_path,
          f"mask size {mask.shape} differs from image size {tuple(image_size)} "
          f"({encoded.image_path})")
  if encoded.labels is None:
    labels = labels_from_mask(mask, num_classes)
  else:
    labels = np.asarray(encoded.labels, np.float32)
  if encoded.expect_tags and not labels.any():
    raise BadRecordError(encoded.tags_path, "empty tag list (no foreground class)")
  return mask, labels


def image_header_size(path):
  """(H, W) of the image file `path` from its header (nothing is decoded)."""
  try:
    with epath.Path(path).open("rb") as f, Image.open(f) as image:
      width, height = image.size
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
    raise BadRecordError(path, f"file not found ({type(error).__name__})") from error
  except _PIL_ERRORS as error:
    raise BadRecordError(path, f"corrupt or unreadable image header ({_pil_problem(error)})"
                         ) from error
  if not width or not height:
    raise BadRecordError(path, f"empty image of size {width}x{height} (WxH)")
  return height, width


def check_record_files(files, *, num_classes):
  """Pre-flight check of a `RecordFiles`: the image header, the whole mask, the tags.

  Everything `decode_record` checks except the image's pixel data (a truncated JPEG whose
  header is intact passes). Returns the image's (H, W); raises `BadRecordError`.
  """
  image_size = image_header_size(files.image_path)
  _mask_and_labels(files.read(with_image=False), image_size, num_classes=num_classes)
  return image_size


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


class BadFileLog:
  """The distinct bad files of a run, shared by every process that reads its data.

  One marker file per bad path in `directory`, a local temporary directory (grain workers get
  its name with the pickled source). The marker is created atomically (a hard link), so the
  process that sees a file first is the one that warns, and a file read again (each epoch, or
  by several workers) is counted once.
  """

  def __init__(self, directory):
    self.directory = str(directory)

  def add(self, error):
    """Records `error` (a `BadRecordError`); True when its file was not recorded before."""
    marker = os.path.join(self.directory,
                          hashlib.sha256(error.path.encode()).hexdigest() + ".json")
    if os.path.exists(marker):
      return False
    try:
      descriptor, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
    except FileNotFoundError:  # The run that owned this log has ended: warn, count nothing.
      return True
    with os.fdopen(descriptor, "w") as f:
      json.dump({"path": error.path, "problem": error.problem}, f)
    try:
      os.link(temporary, marker)  # Fails if another process was first.
      return True
    except FileExistsError:
      return False
    finally:
      os.unlink(temporary)

  def files(self):
    """{path: problem} of every bad file recorded so far by any process, sorted by path."""
    found = {}
    for name in os.listdir(self.directory):
      if name.endswith(".json"):
        with open(os.path.join(self.directory, name)) as f:
          entry = json.load(f)
        found[entry["path"]] = entry["problem"]
    return dict(sorted(found.items()))

  def summary(self):
    """'N bad files skipped: a (problem), b (problem), ...', or None when there were none."""
    found = self.files()
    if not found:
      return None
    named = "; ".join(f"{path} ({problem})" for path, problem in
                      list(found.items())[:_MAX_SUMMARY_FILES])
    more = f"; and {len(found) - _MAX_SUMMARY_FILES} more" if len(found) > _MAX_SUMMARY_FILES else ""
    return (f"{len(found)} bad file{'s' if len(found) > 1 else ''} skipped "
            f"(data.skip_bad_records=True): {named}{more}")


_current_log = None  # The `BadFileLog` new sources report to (see `logs_bad_files`).


def current_bad_file_log():
  """The log of the run in progress (`logs_bad_files`), else one for this whole process."""
  global _current_log
  if _current_log is None:
    directory = tempfile.mkdtemp(prefix="rsepm_bad_files_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    _current_log = BadFileLog(directory)
  return _current_log


def logs_bad_files(run):
  """Decorates a run (training, `--mode=eval`, `--mode=export`) with a `BadFileLog` of its own.

  Sources built during the run report to it; when the run ends (or fails) the summary of the
  skipped files is logged.
  """
  @functools.wraps(run)
  def run_with_log(*args, **kwargs):
    global _current_log
    previous = _current_log
    with tempfile.TemporaryDirectory(prefix="rsepm_bad_files_") as directory:
      _current_log = log = BadFileLog(directory)
      try:
        return run(*args, **kwargs)
      finally:
        _current_log = previous
        summary = log.summary()
        if summary:
          logging.warning("%s", summary)
  return run_with_log


class RecordSource:
  """Base grain random-access source with bad-record handling.

  Subclasses set `self.num_classes`, implement `__len__` and `read_encoded(index)`.
  `__getitem__` decodes it; with `skip_bad_records` a `BadRecordError` becomes `None`, and its
  file goes to `bad_files` (the run's `BadFileLog`), with one warning per file for the run.
  """

  def __init__(self, *, skip_bad_records):
    self.skip_bad_records = skip_bad_records
    self.bad_files = current_bad_file_log()

  def __len__(self):
    raise NotImplementedError

  def read_encoded(self, index):
    raise NotImplementedError

  def __getitem__(self, index):
    """Record `index` as the shared dict, or None for a skipped bad record."""
    return self._guarded(lambda: decode_record(
        self.read_encoded(index), num_classes=self.num_classes))

  def validated_encoded(self, index):
    """(`EncodedRecord`, decoded record) after validation, or None for a skipped bad record."""
    def read_and_validate():
      encoded = self.read_encoded(index)
      return encoded, decode_record(encoded, num_classes=self.num_classes)
    return self._guarded(read_and_validate)

  def report_missing_files(self, path, message):
    """Construction-time check: raise `BadRecordError(path, message)`, or warn when skipping."""
    if not self.skip_bad_records:
      raise BadRecordError(path, message)
    logging.warning("%s: %s; these records will be skipped (skip_bad_records=True).", path,
                    message)

  def skip_bad_record(self, error):
    """Counts `error`'s file as skipped; warns the first time the run sees that file."""
    if self.bad_files.add(error):
      logging.warning("Skipping bad file %s (skip_bad_records=True; each file is reported "
                      "once, the list at the end of the run).", error)

  def _guarded(self, load):
    try:
      return load()
    except BadRecordError as error:
      if not self.skip_bad_records:
        raise
      self.skip_bad_record(error)
      return None


class FileRecordSource(RecordSource):
  """A `RecordSource` whose records are files, located by `record_files(index)` (VOC, COCO).

  Reading opens the files; the pre-flight check (`preflight.py`) checks them with
  `check_record_files` without decoding the images.
  """

  def record_files(self, index):
    """`RecordFiles` of record `index`; raises `BadRecordError` for a file known missing."""
    raise NotImplementedError

  def read_encoded(self, index):
    return self.record_files(index).read()
