"""Pre-flight check of every split a run will read, before its first step.

A bad file found by the final evaluation after 30 epochs costs the whole run, so training
checks its train and evaluation splits first (the train split with its masks from
`data.train_mask_dir` when that is set), `--mode=eval` its evaluation split and
`--mode=export` its export split (`check_splits`). For sources of files (VOC, COCO), every
record is checked: the listed image and mask exist (from the directory listings the source made
at construction), the image header is readable, the mask decodes with values in 0..C or 255 and
has the image's size, the tag list is not empty, and an image that evaluation or export will
read fits `data.eval_size` (evaluation pads to it and never resizes). Images are not decoded
(headers only), so a JPEG whose header is intact but whose data is truncated is found only
when it is read; masks are small PNGs and are decoded. Reads go through a thread pool, since
they may be gs:// reads. ArrayRecord splits get the cheap checks (the split has records, the
first one decodes); synthetic data is generated in memory and needs none.

On several hosts each checks its share of the records (`i::n`) and the hosts then agree, by
an all-gather of their counts, whether the run stops: every host stops, those that found bad
files naming them. Bad files stop the run with up to `_MAX_NAMED_FILES` of them named, or, with
`data.skip_bad_records`, go to the run's `records.BadFileLog` (one warning each; they count
once in the end-of-run summary however often they are read).
"""
import concurrent.futures
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from rsepm_jax.data import records
from rsepm_jax.data import sources

_NUM_THREADS = 32  # Concurrent file reads (I/O bound: the files may be on gs://).
_MAX_NAMED_FILES = 10  # How many bad files an error names.


class BadSplitError(ValueError):
  """Bad files in the splits of a run; `errors` holds a `records.BadRecordError` for each."""

  def __init__(self, message, errors):
    super().__init__(message)
    self.errors = errors


def check_splits(data_config, *, train=(), evaluated=()):
  """Checks the splits `train` (read through the train transforms) and `evaluated` (read whole,
  padded to `data.eval_size`: evaluation and export); logs what was checked and how long it took.

  Every split is checked before anything is raised: `BadSplitError` names the bad files of all
  of them (unless `data.skip_bad_records`), `ValueError` the images larger than
  `data.eval_size` in an evaluated split.
  """
  start = time.perf_counter()
  num_records, bad, too_large = 0, [], []
  # (split, read with the masks of data.train_mask_dir): a train split with such masks is also
  # checked with its ground truth when it is evaluated.
  train_masks = bool(data_config.get("train_mask_dir"))
  reads = dict.fromkeys([(split, train_masks) for split in train]
                        + [(split, False) for split in evaluated])
  for split, with_train_masks in reads:
    max_size = data_config.eval_size if split in evaluated and not with_train_masks else None
    checked = _check_split(data_config, split, max_size, jax.process_index(), jax.process_count(),
                           with_train_masks)
    if checked is None:
      continue
    source, errors, large = checked
    num_records += len(source)  # the whole split (a host checks its share of file sources)
    too_large += large
    if errors and source.skip_bad_records:
      for error in errors:
        source.skip_bad_record(error)
      logging.warning("Pre-flight check of split %r: %d bad files will be skipped "
                      "(data.skip_bad_records=True).", split, len(errors))
    elif errors:
      bad.append((split, source, errors))
  if num_records:
    logging.info("Pre-flight check done: %d records in %.1f s.", num_records,
                 time.perf_counter() - start)
  if jax.process_count() > 1:
    _stop_every_host_if_one_found_bad_data(bool(bad or too_large))
  if bad:
    raise BadSplitError(_bad_files_message(bad), [e for _, _, errors in bad for e in errors])
  if too_large:
    raise ValueError(_too_large_message(too_large, data_config.eval_size))


def check_training_splits(data_config):
  """`check_splits` for a training run: the train split and every evaluation split."""
  check_splits(data_config, train=(data_config.train_split,),
               evaluated=records.eval_splits(data_config))


def _stop_every_host_if_one_found_bad_data(found_here):
  """All hosts learn which found bad data; a host whose share was clean raises too (the others
  name the files), so that no host goes on alone into the first collective."""
  found = multihost_utils.process_allgather(np.int32(found_here))
  hosts = [int(host) for host in np.flatnonzero(found)]
  if hosts and not found_here:
    raise BadSplitError(
        f"Pre-flight check: host(s) {hosts} found bad data in their share of the records (named "
        "in their logs); this host's share is clean. Every host stops.", [])


def _check_split(data_config, split, max_size, process_index=0, process_count=1,
                 train_masks=False):
  """(source, [BadRecordError], [(path, (H, W)) larger than `max_size`]) of one split (a file
  source: this host's share of its records), or None when there is nothing to check.
  `train_masks`: with the masks of `data.train_mask_dir` (`sources.with_train_masks`)."""
  source = sources.make_source(data_config, split)
  if train_masks:
    source = sources.with_train_masks(data_config, source)
  if isinstance(source, records.FileRecordSource):
    return _check_files(source, split, max_size, range(process_index, len(source), process_count))
  if isinstance(source, records.RecordSource):
    return _check_first_record(source, split, max_size)
  logging.info("Pre-flight check: split %r of data.name=%r is generated in memory; nothing to "
               "check.", split, data_config.name)
  return None


def _check_files(source, split, max_size, indices):
  start = time.perf_counter()

  def check(index):
    """(BadRecordError or None, (H, W) or None, `RecordFiles` or None) of record `index`."""
    try:
      files = source.record_files(index)
      return None, records.check_record_files(files, num_classes=source.num_classes), files
    except records.BadRecordError as error:
      return error, None, None

  with concurrent.futures.ThreadPoolExecutor(_NUM_THREADS) as pool:
    results = list(pool.map(check, indices))
  errors = [error for error, _, _ in results if error is not None]
  num_masks = sum(files is not None and files.mask_path is not None for _, _, files in results)
  share = "" if len(indices) == len(source) else f" of {len(source)} (this host's share)"
  logging.info("Pre-flight check of split %r (%r): %d records%s (image headers, %d masks decoded, "
               "tags) in %.1f s; %d bad.", split, source, len(indices), share, num_masks,
               time.perf_counter() - start, len(errors))
  too_large = [(str(files.image_path), size) for _, size, files in results
               if max_size is not None and size is not None and max(size) > max_size]
  return source, errors, too_large


def _check_first_record(source, split, max_size):
  """Cheap checks of a source read from records: it has records and the first one decodes."""
  if not len(source):
    raise ValueError(f"Split {split!r} ({source!r}) has no records.")
  try:
    record = records.decode_record(source.read_encoded(0), num_classes=source.num_classes)
  except records.BadRecordError as error:
    return source, [error], []
  logging.info("Pre-flight check of split %r (%r): %d records; the first decodes (the others "
               "are checked as they are read).", split, source, len(source))
  size = record["image"].shape[:2]
  too_large = [] if max_size is None or max(size) <= max_size else [(f"{source!r}[0]", size)]
  return source, [], too_large


def _bad_files_message(bad):
  """The error for `bad` [(split, source, [BadRecordError])], up to `_MAX_NAMED_FILES` named."""
  lines, named = [], 0
  for split, source, errors in bad:
    lines.append(f"split {split!r} ({source!r}): {len(errors)} bad "
                 f"file{'s' if len(errors) > 1 else ''}")
    for error in errors[:max(_MAX_NAMED_FILES - named, 0)]:
      lines.append(f"  {error}")
    named += len(errors)
  total = sum(len(errors) for _, _, errors in bad)
  if total > _MAX_NAMED_FILES:
    lines.append(f"  ... {total - _MAX_NAMED_FILES} more not named here")
  return ("Pre-flight check found bad data:\n" + "\n".join(lines) + "\nFix or remove them, or "
          "set data.skip_bad_records=True to skip them (counted and listed at the end of the run).")


def _too_large_message(too_large, max_size):
  """The error for images `too_large` [(path, (H, W))]: evaluation pads, never resizes."""
  named = ", ".join(f"{path} ({height}x{width})" for path, (height, width) in
                    too_large[:_MAX_NAMED_FILES])
  more = ", ..." if len(too_large) > _MAX_NAMED_FILES else ""
  largest = max(max(size) for _, size in too_large)
  return (f"Pre-flight check: images larger than data.eval_size={max_size} in the evaluated "
          f"splits ({len(too_large)}; evaluation and export pad each image to eval_size x "
          f"eval_size and never resize it): {named}{more}. Set data.eval_size >= {largest}.")
