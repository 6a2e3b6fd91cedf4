"""grain input pipelines: infinite shuffled train batches and padded, finite eval batches.

Both yield host-local numpy batches; the train loop turns them into global arrays with
`jax.make_array_from_process_local_data` (jax conventions 5.2, 5.5).

Train (spec 7.2): one global shuffle, identical on every host and reshuffled each epoch;
the random transforms are applied before the per-host shard so that each record's
augmentation depends only on its global position (not on which host reads it or how many
hosts there are); host `i` of `n` then reads the `i`-th contiguous slice of every global
batch, so the global batch, in order, is the same for any number of hosts (a 2-host run
computes what a 1-host run with as many devices computes). Batches are formed before
grain's worker processes take them (worker `k` of `w` reads whole batches `k::w`, handed out
in order), so the batches are also the same for any `data.num_workers`. A record the source
returns as None (a bad record it was told to skip) is replaced by the next good record in
source order, so every batch is full. The iterator's state is grain's JSON state:
`get_state`/`set_state` and `grain.checkpoint.CheckpointSave/Restore` resume it exactly,
with or without worker processes (same host count only).

Eval: each host reads a disjoint shard `i::n` of the split in order, padded with dummy
records (`valid` False, mask all 255) so every host yields the same number of batches.
"""
import math

import grain
import jax
import numpy as np

from rsepm_jax.data import sources
from rsepm_jax.data import transforms as transforms_lib


def _resolve_processes(process_index, process_count):
  """Fills in jax's process index/count and checks that they agree."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index must lie in [0, process_count={process_count}), got {process_index}.")
  return process_index, process_count


def _local_batch_size(global_batch_size, process_count):
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"The global batch size {global_batch_size} must be a positive multiple of the "
        f"process count {process_count} (each host reads global / process_count images).")
  return global_batch_size // process_count


def _read_options(data_config, records_per_element=1):
  """grain read threads and read-ahead; `data.prefetch_buffer_size` counts records."""
  return grain.ReadOptions(
      num_threads=data_config.read_threads,
      prefetch_buffer_size=max(1, data_config.prefetch_buffer_size // records_per_element))


class _NextGoodRecord:
  """Random-access view of `source` where a skipped bad record (None) is replaced by the next
  good record in source order (wrapping around), so that train batches stay full."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    for offset in range(len(self._source)):
      record = self._source[(index + offset) % len(self._source)]
      if record is not None:
        return record
    raise ValueError(f"Every record of {self._source!r} is bad (all were skipped).")


def _without_id(record):
  """Drops the string `id`, which cannot go to the device."""
  return {key: value for key, value in record.items() if key != "id"}


class _HostSliceOfGlobalBatches(grain.MapDataset):
  """Host `process_index`'s rows of consecutive global batches of `parent`.

  Global batch `j` is `parent[j * B : (j + 1) * B]` with B = local_batch_size x process_count;
  this host's `j`-th local batch is its slice `[process_index * b, (process_index + 1) * b)`.
  """

  def __init__(self, parent, process_index, process_count, local_batch_size):
    super().__init__(parent)
    self._process_index = process_index
    self._process_count = process_count
    self._local_batch_size = local_batch_size

  def __len__(self):
    return len(self._parent) // self._process_count

  def __str__(self):
    return (f"HostSliceOfGlobalBatches(process={self._process_index}/{self._process_count}, "
            f"local_batch_size={self._local_batch_size})")

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._local_batch_size)
    global_batch_size = self._local_batch_size * self._process_count
    return self._parent[batch * global_batch_size + self._process_index * self._local_batch_size + row]


def num_records(data_config, split):
  """Number of records in `split` (bad records included)."""
  return len(sources.make_source(data_config, split))


def train_iterator(data_config, global_batch_size, seed, process_index=None,
                   process_count=None):
  """Infinite iterator of host-local train batches of `data_config.train_split`.

  Batches: `image` uint8 [b, S, S, 3], `mask` uint8 [b, S, S], `labels` float32 [b, C],
  `crop_box` int32 [b, 4], with b = global_batch_size / process_count and S =
  `data.crop_size`; masks from `data.train_mask_dir` when set (`sources.with_train_masks`).
  Returns a grain `DatasetIterator` (call `close()` when done).
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  source = sources.with_train_masks(
      data_config, sources.make_source(data_config, data_config.train_split))
  if not len(source):
    raise ValueError(f"The train split {data_config.train_split!r} of dataset "
                     f"{data_config.name!r} is empty.")
  dataset = grain.MapDataset.source(_NextGoodRecord(source)).seed(seed).shuffle().repeat(None)
  for transform in transforms_lib.train_transforms(data_config):
    if isinstance(transform, grain.transforms.RandomMap):
      dataset = dataset.random_map(transform)
    else:
      dataset = dataset.map(transform)
  dataset = _HostSliceOfGlobalBatches(
      dataset.map(_without_id), process_index, process_count, local_batch_size)
  # Batched before `to_iter_dataset`: grain's workers then split whole batches, not records.
  dataset = dataset.batch(local_batch_size, drop_remainder=True)
  dataset = dataset.to_iter_dataset(_read_options(data_config, local_batch_size))
  if data_config.num_workers > 0:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.num_workers))
    dataset = dataset.map(_out_of_shared_memory)
  return iter(dataset)


def _out_of_shared_memory(batch):
  """Copies a batch from grain's worker shared memory into process memory.

  grain unlinks a shared block when its array is garbage collected, on a background thread.
  Measured on CPU: after a training run one batch's arrays were still alive in a reference
  cycle (freed only by the cycle collector), and at exit the interpreter ended with "There
  appear to be 4 leaked shared_memory objects". One memcpy per batch releases each block at once.
  """
  return {key: np.array(value) for key, value in batch.items()}


def num_eval_batches(num_split_records, global_batch_size, process_count):
  """Batches every host yields for a split of `num_split_records` records."""
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  return math.ceil(math.ceil(num_split_records / process_count) / local_batch_size)


class _HostEvalShard:
  """Random-access view of one host's eval records `process_index::process_count`.

  Transformed records gain `valid` True; positions past the host's shard, and bad records
  the source returned as None, become `padding_record` (`valid` False).
  """

  def __init__(self, source, transforms, process_index, process_count, length,
               padding_record):
    self._source = source
    self._num_source_records = len(source)
    self._transforms = transforms
    self._process_index = process_index
    self._process_count = process_count
    self._length = length
    self._padding_record = padding_record

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    source_index = self._process_index + index * self._process_count
    if source_index >= self._num_source_records:
      return self._padding_record
    record = self._source[source_index]
    if record is None:
      return self._padding_record
    for transform in self._transforms:
      record = transform.map(record)
    return {**record, "valid": np.True_}


def eval_batches(data_config, split, global_batch_size, process_index=None,
                 process_count=None):
  """Finite, re-iterable host-local eval batches over all of `split`.

  Every host yields `num_eval_batches(N, global_batch_size, process_count)` batches of
  b = global_batch_size / process_count: `image` uint8 [b, S, S, 3], `mask` uint8
  [b, S, S], `labels` float32 [b, C], `crop_box` int32 [b, 4] (= (0, 0, h, w)), `valid`
  bool [b] and `id` str [b] (host-side only), S = `data.eval_size`. Padding entries have
  `valid` False, image 0, mask 255, labels 0, crop_box 0 and id "".
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  source = sources.make_source(data_config, split)
  num_batches = num_eval_batches(len(source), global_batch_size, process_count)
  size = data_config.eval_size
  padding_record = {
      "image": np.full((size, size, 3), transforms_lib.IMAGE_PAD_VALUE, np.uint8),
      "mask": np.full((size, size), transforms_lib.MASK_PAD_VALUE, np.uint8),
      "labels": np.zeros((data_config.num_classes,), np.float32),
      "crop_box": np.zeros((4,), np.int32),
      "id": "",
      "valid": np.False_,
  }
  shard = _HostEvalShard(source, transforms_lib.eval_transforms(data_config), process_index,
                         process_count, num_batches * local_batch_size, padding_record)
  dataset = grain.MapDataset.source(shard).to_iter_dataset(_read_options(data_config))
  return dataset.batch(local_batch_size)
