"""Dataset source factory: `data.name` -> `rsepm_jax.data.<name>.from_config(data_config, split)`.

A source is a grain random-access source (`__len__`, deterministic `__getitem__(int)`)
returning records in the shared format (`image`, `mask`, `labels`, `id`), or None for a
bad record it was told to skip (`data.skip_bad_records`); the pipelines drop those.
`with_train_masks` gives a source read for training its masks from `data.train_mask_dir`.
Source modules are imported lazily so that, e.g., the synthetic demo never imports the
VOC or TFDS readers.
"""
import importlib

from rsepm_jax.data import mask_folder

SOURCE_NAMES = ("synthetic", "voc", "coco", "array_record")


def make_source(data_config, split):
  """Builds the random-access source for `split` of the dataset `data_config.name`."""
  if data_config.name not in SOURCE_NAMES:
    raise ValueError(
        f"Unknown dataset data.name={data_config.name!r}; expected one of "
        f"{', '.join(SOURCE_NAMES)}.")
  module = importlib.import_module(f"rsepm_jax.data.{data_config.name}")
  return module.from_config(data_config, split)


def with_train_masks(data_config, source):
  """`source` read for training: with its masks from `data.train_mask_dir` when that is set
  (`mask_folder.with_mask_folder`), else `source` itself. Never for evaluation, which scores
  against the ground truth."""
  if data_config.get("train_mask_dir"):
    return mask_folder.with_mask_folder(source, data_config.train_mask_dir)
  return source
