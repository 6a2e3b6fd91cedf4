r"""Scores a folder of label PNGs against a split's ground truth: the papers' pseudo-label quality.

  python -m rsepm_jax.label_eval --config=configs/puzzlecam_voc.py \
      --config.data.root=/data/VOCdevkit/VOC2012 --labels=/ckpt/chain/random_walk/train_aug \
      --split=train

Every image of the split (default `config.export.split`) must have `<labels>/<id>.png`, a label
map of the image's size (0 background, c + 1 class c; the palette PNGs that `--mode=export`, the
random walk and the pipeline write). Pixels labelled 255 (the confident labels' "unsure") are
left out of the counts and reported as `ignored_fraction`; GT 255 is not counted, as everywhere.
mIoU over the C + 1 classes, FP and FN averaged over the foreground classes (spec 8.2; Puzzle-CAM's
evaluate.py). Each host reads its share of the split; the counts are summed over the hosts and
process 0 writes `<labels>_scores.json` (or `--out`).
"""
import contextlib
import json

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags
import numpy as np
from PIL import Image

from rsepm_jax import cli_errors
from rsepm_jax import config_check
from rsepm_jax import evaluate
from rsepm_jax import metric_writer
from rsepm_jax import metrics
from rsepm_jax import paper_eval
from rsepm_jax import parallel
from rsepm_jax.data import pipeline
from rsepm_jax.data import preflight

IGNORE = 255
_SHOWN = 5  # missing or mis-sized files named in an error


class LabelFolderError(ValueError):
  """A label file is missing, unreadable or of the wrong size (the message names them)."""


def _read_label(path, shape):
  """uint8 `[H, W]` of the PNG at `path`; None when missing; raises on another size."""
  if not path.exists():
    return None
  with path.open("rb") as file:
    label = np.asarray(Image.open(file))
  if label.shape != shape:
    raise LabelFolderError(f"{path}: a {label.shape} label map for an image of {shape} pixels.")
  return label


def count_folder(label_dir, batches, num_labels):
  """Host counts over the valid records of `batches` (`pipeline.eval_batches` dicts with `id`):
  {"confusion": int64 `[K, K]`, "num_images", "ignored", "pixels"}; raises `LabelFolderError`
  naming the missing files."""
  counts = {"confusion": np.zeros((num_labels, num_labels), np.int64), "num_images": 0,
            "ignored": 0, "pixels": 0}
  missing = []
  for batch in batches:
    for i in np.flatnonzero(batch["valid"]):
      top, left, bottom, right = (int(v) for v in batch["crop_box"][i])
      gt = np.asarray(batch["mask"][i, top:bottom, left:right])
      label = _read_label(label_dir / f"{batch['id'][i]}.png", gt.shape)
      if label is None:
        missing.append(str(batch["id"][i]))
        continue
      unsure = label == IGNORE
      if np.any((label > num_labels - 1) & ~unsure):
        raise LabelFolderError(f"{label_dir / batch['id'][i]}.png holds labels above "
                               f"{num_labels - 1} (config.data.num_classes + 1 classes).")
      counted = gt != IGNORE
      counts["ignored"] += int(np.sum(unsure & counted))
      counts["pixels"] += int(np.sum(counted))
      counts["confusion"] = metrics.accumulate(counts["confusion"], metrics.confusion_matrix(
          np.where(unsure, 0, label), gt, num_labels, valid=~unsure))
      counts["num_images"] += 1
  if missing:
    raise LabelFolderError(f"{len(missing)} label PNGs missing in {label_dir}, e.g. "
                           f"{', '.join(f'{name}.png' for name in missing[:_SHOWN])}.")
  return counts


def score_folder(config, label_dir, split=None):
  """Scores the PNGs of `label_dir` against `split` (default `config.export.split`); returns
  {"split", "num_images", "labels" (segmentation scores), "ignored_fraction",
  "all_background_miou"}."""
  split = split or config.export.split
  label_dir = epath.Path(label_dir)
  if not label_dir.is_dir():
    raise LabelFolderError(f"--labels={label_dir}: no such folder.")
  preflight.check_splits(config.data, evaluated=(split,))
  batches = iter(pipeline.eval_batches(config.data, split, config.eval.global_batch_size))
  with contextlib.closing(batches):
    counts = count_folder(label_dir, batches, config.data.num_classes + 1)
  counts = {key: paper_eval.sum_over_hosts(value) for key, value in counts.items()}
  return {"split": split, "num_images": int(counts["num_images"]),
          "labels": metrics.segmentation_scores(counts["confusion"]),
          "ignored_fraction": float(counts["ignored"]) / max(int(counts["pixels"]), 1),
          "all_background_miou": metrics.all_background_miou(counts["confusion"])}


def write_scores(results, config, path):
  """Logs the table and (process 0) writes `results` as JSON to `path`."""
  logging.info("Labels of split %r (%d images, %.1f%% of the GT pixels labelled 255):\n%s",
               results["split"], results["num_images"], 100 * results["ignored_fraction"],
               metrics.format_table(results["labels"], evaluate.class_names(config)))
  if jax.process_index() == 0:
    epath.Path(path).write_text(json.dumps(evaluate.jsonable(results), indent=2))
  logging.info("Scores written to %s.", path)


def main(argv):
  del argv
  parallel.maybe_initialize_distributed()
  with cli_errors.one_line_errors(LabelFolderError):
    config = _CONFIG.value
    config_check.validate(config)
    label_dir = _LABELS.value.rstrip("/")
    results = score_folder(config, label_dir, _SPLIT.value)
    write_scores(results, config, _OUT.value or f"{label_dir}_scores.json")


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (data set, classes).",
                                            lock_config=True)
  _LABELS = flags.DEFINE_string("labels", None, "Folder of <id>.png label maps.", required=True)
  _SPLIT = flags.DEFINE_string("split", None, "Split to score (default config.export.split).")
  _OUT = flags.DEFINE_string("out", None, "Scores JSON (default <labels>_scores.json).")
  jax.config.config_with_absl()
  app.run(main, flags_parser=config_check.parse_flags)
