"""Tests for rsepm_jax.data.pipeline and rsepm_jax.data.sources, on an in-test source."""
import sys
import types

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rsepm_jax.data import pipeline
from rsepm_jax.data import sources

NUM_CLASSES = 8  # labels spell the record index in binary, so indices < 256


class IndexedSource:
  """Deterministic records of varied sizes whose `labels` are the bits of their index.

  The labels pass through every transform unchanged, so a batch row's source index can be
  read back from it. Indices in `bad_indices` return None, like a source told to skip
  bad records.
  """

  def __init__(self, num_records, bad_indices=()):
    self.num_records = num_records
    self.bad_indices = frozenset(bad_indices)

  def __len__(self):
    return self.num_records

  def __getitem__(self, index):
    if index in self.bad_indices:
      return None
    rng = np.random.default_rng(index)
    height, width = 12 + index % 5, 14 + index % 7
    return {
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "mask": rng.choice(np.array([0, 2, 5, 255], np.uint8), (height, width)),
        "labels": ((index >> np.arange(NUM_CLASSES)) & 1).astype(np.float32),
        "id": f"rec{index:03d}",
    }


def _indices(labels):
  """Source index of each row of `labels: [b, C]`."""
  return [int(i) for i in labels @ (2 ** np.arange(NUM_CLASSES))]


def _data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name="synthetic", train_split="train", eval_split="val", num_classes=NUM_CLASSES,
      crop_size=16, resize_range=(12, 24), hflip=True, color_jitter=(0.3, 0.3, 0.3, 0.1),
      eval_size=20, num_workers=0, read_threads=2, prefetch_buffer_size=8,
      skip_bad_records=True))
  config.update(overrides)
  return config


NO_AUGMENT = dict(resize_range=None, hflip=False, color_jitter=None)


@pytest.fixture
def use_source(monkeypatch):
  """Makes `sources.make_source` return the given in-test source."""
  def install(source):
    monkeypatch.setattr(sources, "make_source", lambda data_config, split: source)
  return install


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_train_batch_shapes_dtypes_and_padding(use_source):
  use_source(IndexedSource(20))
  iterator = pipeline.train_iterator(_data_config(), 4, seed=0, process_index=0,
                                     process_count=1)
  for batch in _take(iterator, 3):
    assert set(batch) == {"image", "mask", "labels", "crop_box"}
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == (4, 16, 16) and batch["mask"].dtype == np.uint8
    assert batch["labels"].shape == (4, NUM_CLASSES)
    assert batch["labels"].dtype == np.float32
    assert batch["crop_box"].shape == (4, 4) and batch["crop_box"].dtype == np.int32
    for image, mask, (top, left, bottom, right) in zip(batch["image"], batch["mask"],
                                                         batch["crop_box"]):
      inside = np.zeros((16, 16), bool)
      inside[top:bottom, left:right] = True
      assert inside.any()
      assert np.all(mask[~inside] == 255) and np.all(image[~inside] == 0)
      assert set(np.unique(mask)) <= {0, 2, 5, 255}
  iterator.close()


def test_two_hosts_read_disjoint_shards_that_cover_each_epoch(use_source):
  use_source(IndexedSource(12))
  config = _data_config(**NO_AUGMENT)
  per_host = []
  for process_index in (0, 1):
    iterator = pipeline.train_iterator(config, 4, seed=3, process_index=process_index,
                                       process_count=2)
    batches = _take(iterator, 6)  # 2 epochs: 12 records / 2 hosts / 2 per batch * 2
    assert all(batch["image"].shape[0] == 2 for batch in batches)
    per_host.append([i for batch in batches for i in _indices(batch["labels"])])
    iterator.close()
  # Global batch j is host 0's rows then host 1's rows of batch j (2 images each).
  global_order = [i for j in range(6) for h in (0, 1) for i in per_host[h][2 * j:2 * j + 2]]
  epochs = [global_order[:12], global_order[12:]]
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert epochs[0] != epochs[1]  # reshuffled each epoch
  assert epochs[0] != sorted(epochs[0])


def test_two_hosts_together_yield_the_one_host_global_batches(use_source):
  use_source(IndexedSource(10))
  config = _data_config()
  single = pipeline.train_iterator(config, 4, seed=1, process_index=0, process_count=1)
  one_host = _take(single, 4)
  single.close()
  per_host = []
  for process_index in (0, 1):
    iterator = pipeline.train_iterator(config, 4, seed=1, process_index=process_index,
                                       process_count=2)
    per_host.append(_take(iterator, 4))
    iterator.close()
  # Same images, same augmentation, same order: host h holds rows [2 h, 2 h + 2) of each batch.
  for j in range(4):
    for key in ("image", "mask", "labels", "crop_box"):
      np.testing.assert_array_equal(
          np.concatenate([per_host[0][j][key], per_host[1][j][key]]), one_host[j][key])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_round_trip(use_source, num_workers):
  use_source(IndexedSource(14, bad_indices={3}))
  config = _data_config(num_workers=num_workers)
  iterator = pipeline.train_iterator(config, 4, seed=5, process_index=0, process_count=1)
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 4)
  iterator.close()
  resumed = pipeline.train_iterator(config, 4, seed=5, process_index=0, process_count=1)
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 4)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  resumed.close()


def test_orbax_checkpoint_round_trip(use_source, tmp_path):
  use_source(IndexedSource(14))
  config = _data_config()
  iterator = pipeline.train_iterator(config, 4, seed=2, process_index=0, process_count=1)
  _take(iterator, 3)
  with ocp.CheckpointManager(tmp_path, item_names=("data_iter",)) as manager:
    manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = _take(iterator, 2)
    resumed = pipeline.train_iterator(config, 4, seed=2, process_index=0, process_count=1)
    manager.restore(3, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  for want, got in zip(expected, _take(resumed, 2)):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
  iterator.close()
  resumed.close()


def test_bad_records_are_replaced_by_the_next_good_one_and_batches_stay_full(use_source):
  bad = {1, 4, 5, 11}
  use_source(IndexedSource(12, bad_indices=bad))
  iterator = pipeline.train_iterator(_data_config(**NO_AUGMENT), 3, seed=0, process_index=0,
                                     process_count=1)
  batches = _take(iterator, 8)  # two epochs of 12 positions
  iterator.close()
  assert all(batch["image"].shape[0] == 3 for batch in batches)
  seen = [i for batch in batches for i in _indices(batch["labels"])]
  # 1 -> 2, 4 and 5 -> 6, 11 -> 0 (wraps around); every good record still appears.
  expected = sorted([0, 2, 3, 6, 7, 8, 9, 10] + [2, 6, 6, 0])
  assert sorted(seen[:12]) == expected and sorted(seen[12:]) == expected


def test_batches_do_not_depend_on_the_number_of_workers(use_source):
  use_source(IndexedSource(16, bad_indices={3}))
  config = _data_config()
  runs = []
  for num_workers in (0, 2):
    config.num_workers = num_workers
    iterator = pipeline.train_iterator(config, 4, seed=7, process_index=0, process_count=1)
    runs.append(_take(iterator, 6))
    iterator.close()
  for without_workers, with_workers in zip(*runs):
    for key in ("image", "mask", "labels", "crop_box"):
      np.testing.assert_array_equal(with_workers[key], without_workers[key])


def test_global_batch_must_divide_among_processes(use_source):
  use_source(IndexedSource(8))
  with pytest.raises(ValueError, match="multiple of the process count 2"):
    pipeline.train_iterator(_data_config(), 5, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    pipeline.eval_batches(_data_config(), "val", 4, process_index=0, process_count=3)


@pytest.mark.parametrize("process_count, global_batch_size", [(2, 4), (3, 6)])
def test_eval_batches_pad_hosts_to_equal_length(use_source, process_count, global_batch_size):
  source = IndexedSource(11, bad_indices={5})
  use_source(source)
  local_batch = global_batch_size // process_count
  expected_batches = -(-(-(-11 // process_count)) // local_batch)
  assert pipeline.num_eval_batches(11, global_batch_size, process_count) == expected_batches
  valid_ids = []
  for process_index in range(process_count):
    batches = list(pipeline.eval_batches(_data_config(), "val", global_batch_size,
                                         process_index=process_index,
                                         process_count=process_count))
    assert len(batches) == expected_batches
    for batch in batches:
      assert batch["image"].shape == (local_batch, 20, 20, 3)
      assert batch["valid"].dtype == np.bool_ and batch["id"].dtype.kind == "U"
      for row in range(local_batch):
        if not batch["valid"][row]:
          assert np.all(batch["mask"][row] == 255) and np.all(batch["image"][row] == 0)
          assert batch["id"][row] == "" and not batch["crop_box"][row].any()
          continue
        record = source[int(batch["id"][row][3:])]
        height, width = record["mask"].shape
        np.testing.assert_array_equal(batch["crop_box"][row], [0, 0, height, width])
        np.testing.assert_array_equal(batch["image"][row, :height, :width], record["image"])
        np.testing.assert_array_equal(batch["mask"][row, :height, :width], record["mask"])
        assert np.all(batch["mask"][row, height:] == 255)
        np.testing.assert_array_equal(batch["labels"][row], record["labels"])
        valid_ids.append(str(batch["id"][row]))
  assert sorted(valid_ids) == [f"rec{i:03d}" for i in range(11) if i != 5]


def test_make_source_dispatches_lazily_and_names_choices(monkeypatch):
  calls = []
  fake = types.ModuleType("rsepm_jax.data.array_record")
  fake.from_config = lambda data_config, split: calls.append(split) or IndexedSource(7)
  monkeypatch.setitem(sys.modules, "rsepm_jax.data.array_record", fake)
  config = _data_config(name="array_record")
  assert len(sources.make_source(config, "train")) == 7
  assert pipeline.num_records(config, "val") == 7
  assert calls == ["train", "val"]
  with pytest.raises(ValueError, match="'imagenet'.*synthetic, voc, coco, array_record"):
    sources.make_source(_data_config(name="imagenet"), "train")


def test_synthetic_source_end_to_end():
  config = _data_config(num_classes=4, crop_size=24, resize_range=(20, 28), eval_size=32)
  config.synthetic = ml_collections.ConfigDict(dict(num_train=6, num_eval=5, image_size=32,
                                                    seed=0, ignore_width=1))
  iterator = pipeline.train_iterator(config, 4, seed=0, process_index=0, process_count=1)
  batch = next(iterator)
  iterator.close()
  assert batch["image"].shape == (4, 24, 24, 3) and batch["labels"].shape == (4, 4)
  batches = list(pipeline.eval_batches(config, "val", 4, process_index=1, process_count=2))
  assert len(batches) == 2  # host 1 holds records 1 and 3 of 5; host 0 holds 3 records
  assert [list(b["valid"]) for b in batches] == [[True, True], [False, False]]
  assert pipeline.num_records(config, "val") == 5
