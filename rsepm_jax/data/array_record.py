"""Datasets as ArrayRecord via tensorflow-datasets, without TensorFlow (jax_conventions 5.6).

`write_array_record` stores each split of a source as a TFDS dataset
`<data_dir>/rsepm_segmentation/<dataset>/1.0.0/` in the ArrayRecord format, one example per
record, in source order:

    image:  bytes    the original image file (JPEG as downloaded; never re-encoded)
    mask:   bytes    the original class-index PNG, or b"" when the record has no mask
    labels: float32 [C] multi-hot
    id:     bytes    the image id

Only `Tensor` features are used: `tfds.features.Image` would need TensorFlow. Sources without
encoded files (e.g. synthetic ones) are stored as lossless PNGs. `ArrayRecordSource` reads a
split back with `tfds.builder_from_directory(...).as_data_source`, which needs no TensorFlow
and reads `gs://` paths, and decodes the records into the shared format (`records.py`).
"""
import concurrent.futures
import io

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from rsepm_jax.data import records

BUILDER_NAME = "rsepm_segmentation"
DATASET_VERSION = "1.0.0"
_READ_CHUNK = 256  # Records read ahead per chunk by the writer's thread pool.


def dataset_dir(data_dir, dataset):
  """Where `write_array_record` puts `dataset` under `data_dir`."""
  return epath.Path(data_dir) / BUILDER_NAME / dataset / DATASET_VERSION


def _encode_png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def encoded_example(source, index):
  """Record `index` of `source` as a TFDS example dict, or None for a skipped bad record.

  Sources with encoded files (`records.RecordSource`) give their file bytes after full
  validation; other sources give arrays, stored as PNG.
  """
  if isinstance(source, records.RecordSource):
    validated = source.validated_encoded(index)
    if validated is None:
      return None
    encoded, record = validated
    image_bytes, mask_bytes = encoded.image_bytes, encoded.mask_bytes or b""
  else:
    record = source[index]
    if record is None:
      return None
    image_bytes, mask_bytes = _encode_png(record["image"]), _encode_png(record["mask"])
  return {"image": image_bytes, "mask": mask_bytes,
          "labels": np.asarray(record["labels"], np.float32), "id": record["id"]}


def _num_classes(source):
  """C of a source: its `num_classes`, else the length of its first record's labels."""
  if hasattr(source, "num_classes"):
    return source.num_classes
  return len(source[0]["labels"])


class RsepmSegmentation(tfds.core.GeneratorBasedBuilder):
  """Writes given sources ({split: source}) as encoded-bytes examples; config = dataset name."""

  VERSION = tfds.core.Version(DATASET_VERSION)

  def __init__(self, *, sources, num_classes, num_threads=16, **kwargs):
    self._sources = sources
    self._num_classes = num_classes
    self._num_threads = num_threads
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Segmentation records for rsepm_jax (see rsepm_jax/data/array_record.py).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "mask": tfds.features.Tensor(shape=(), dtype=np.object_),
            "labels": tfds.features.Tensor(shape=(self._num_classes,), dtype=np.float32),
            "id": tfds.features.Tensor(shape=(), dtype=np.object_),
        }),
        disable_shuffling=True)  # Keeps record i == source record i.

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from the sources.
    return {split: self._generate_examples(source) for split, source in self._sources.items()}

  def _generate_examples(self, source):
    num_skipped = 0
    with concurrent.futures.ThreadPoolExecutor(self._num_threads) as executor:
      for start in range(0, len(source), _READ_CHUNK):
        indices = range(start, min(start + _READ_CHUNK, len(source)))
        for index, example in zip(
            indices, executor.map(lambda i: encoded_example(source, i), indices)):
          if example is None:
            num_skipped += 1
          else:
            yield index, example
    if num_skipped:
      logging.warning("%r: %d bad records skipped, not written.", source, num_skipped)


def write_array_record(sources, *, dataset, data_dir, num_threads=16):
  """Writes `sources` ({split: source}) as ArrayRecord under `dataset_dir(data_dir, dataset)`.

  All splits of a dataset are written at once (TFDS does not add splits to a prepared
  dataset), so an existing directory is an error.
  """
  out = dataset_dir(data_dir, dataset)
  if out.exists():
    raise FileExistsError(f"{out} already exists; delete it or choose another data_dir. All "
                          "splits of a dataset must be written in one call.")
  num_classes = {_num_classes(source) for source in sources.values()}
  if len(num_classes) != 1:
    raise ValueError(f"Sources disagree on the number of classes: {sorted(num_classes)}.")
  builder = RsepmSegmentation(
      sources=sources, num_classes=num_classes.pop(), num_threads=num_threads,
      config=tfds.core.BuilderConfig(name=dataset), data_dir=str(data_dir),
      file_format="array_record")
  builder.download_and_prepare()
  logging.info("Wrote %s: %s", out, {split: info.num_examples
                                     for split, info in builder.info.splits.items()})
  return out


class ArrayRecordSource(records.RecordSource):
  """One split written by `write_array_record`, decoded to the shared record format.

  Attributes:
    num_classes: C, from the stored labels' shape.
    bad_files: the run's `records.BadFileLog` (records skipped with `skip_bad_records`).
  """

  def __init__(self, data_dir, dataset, split, *, skip_bad_records=False):
    super().__init__(skip_bad_records=skip_bad_records)
    self._location = dataset_dir(data_dir, dataset)
    if not (self._location / "dataset_info.json").exists():
      raise FileNotFoundError(
          f"No ArrayRecord dataset at {self._location}; write it with `python -m "
          f"rsepm_jax.data.prepare --dataset={dataset} --out={data_dir} ...`.")
    builder = tfds.builder_from_directory(str(self._location))
    if split not in builder.info.splits:
      raise ValueError(f"Split {split!r} is not in {self._location}; it has "
                       f"{sorted(builder.info.splits)}.")
    self.split = split
    self.num_classes = builder.info.features["labels"].shape[0]
    self._records = builder.as_data_source(split)
    logging.info("ArrayRecord split %r: %d records at %s.", split, len(self._records),
                 self._location)

  def __len__(self):
    return len(self._records)

  def read_encoded(self, index):
    """Stored bytes of record `index` (`records.EncodedRecord`); labels as stored."""
    example = self._records[index]
    image_id = example["id"].decode()
    where = f"{self._location}[{self.split}][{index}] ({image_id})"
    return records.EncodedRecord(
        id=image_id, image_path=f"{where} image", image_bytes=example["image"],
        mask_path=f"{where} mask", mask_bytes=example["mask"] or None,
        labels=example["labels"], tags_path=where, expect_tags=False)

  def __repr__(self):
    return f"ArrayRecordSource({str(self._location)!r}, split={self.split!r})"


def from_config(data_config, split):
  """`ArrayRecordSource` for `split`: `data.root` is the data_dir, `data.dataset` the name."""
  return ArrayRecordSource(
      records.config_field(data_config, "root"), records.config_field(data_config, "dataset"),
      split, skip_bad_records=data_config.get("skip_bad_records", False))
