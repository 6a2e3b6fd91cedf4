"""`config.eval.protocol = "paper"`: the decoder scored as the paper's val protocol (spec 8.1, 8.2).

Per eval image at its own size (the padded record cropped back to its `crop_box`):
`inference.multiscale` over `config.inference.scales` (and flips), `inference.segment` with the
classes of `pred_class >= config.inference.conf_th` (or the GT tags with
`config.eval.gate_by_tags`) and the background of `config.inference.background`, then, with
`config.eval.crf`, `refine.crf.dense_crf` on the image and the background + kept-class channels,
and the argmax. The confusion matrix is streamed (`metrics.confusion_matrix` per image,
accumulated on the host in int64 `[C + 1, C + 1]`, GT 255 ignored), each host over its shard of the split, and summed over
the hosts; no per-image scores are kept.
"""
import contextlib

import jax
from jax.experimental import multihost_utils
import numpy as np

from rsepm_jax import inference
from rsepm_jax import metric_writer
from rsepm_jax import metrics
from rsepm_jax.data import pipeline
from rsepm_jax.refine import crf

PROTOCOLS = ("single", "paper")
_INT32_BITS = 31
_dense_crf = jax.jit(crf.dense_crf)  # one compilation per image size and number of labels


def predict_label(model, variables, image, config, tags=None, use_crf=True):
  """uint8 `[H, W]` label (0 background, c + 1 class c) of one uint8 RGB `[H, W, 3]` image.

  Classes: `tags` (multi-hot `[C]`) when given, else `pred_class >= config.inference.conf_th`.
  `use_crf`: the dense CRF on the image and the background + kept-class channels."""
  settings = config.inference
  scores = inference.multiscale(model, variables, image, tuple(settings.scales), settings.hflip,
                                settings.size_bucket)
  result = inference.segment(
      scores["pred_mask"], scores["pred_class"], tags=tags,
      conf_th=settings.conf_th, bg_gamma=settings.bg_gamma,
      bg_threshold=settings.bg_threshold if settings.background == "constant" else None)
  if not use_crf or not len(result["keys"]):
    return result["label"]
  labels = np.concatenate([[0], result["keys"] + 1])  # background and the kept classes
  refined = _dense_crf(image, result["probs"][..., labels])
  return labels[np.argmax(np.asarray(refined), axis=-1)].astype(np.uint8)


def stream_confusion(model, variables, config, batches, progress=None):
  """(int64 `[C + 1, C + 1]`, number of images) over the valid records of host `batches`
  (`pipeline.eval_batches` dicts: image uint8 `[b, S, S, 3]`, mask `[b, S, S]`, labels `[b, C]`,
  crop_box `[b, 4]` = (0, 0, h, w), valid `[b]`)."""
  num_labels = config.data.num_classes + 1
  total = np.zeros((num_labels, num_labels), np.int64)
  num_images = 0
  for batch in batches:
    for i in np.flatnonzero(batch["valid"]):
      top, left, bottom, right = (int(v) for v in batch["crop_box"][i])
      image = np.asarray(batch["image"][i, top:bottom, left:right])
      tags = batch["labels"][i] > 0 if config.eval.gate_by_tags else None
      label = predict_label(model, variables, image, config, tags, config.eval.crf)
      total = metrics.accumulate(total, metrics.confusion_matrix(
          label, batch["mask"][i, top:bottom, left:right], num_labels))
      num_images += 1
    if progress is not None:
      progress.advance(len(batch["valid"]))
  return total, num_images


def sum_over_hosts(counts):
  """Host int64 arrays summed over every process (int32 halves, as JAX has no int64 by default)."""
  counts = np.asarray(counts, np.int64)
  low = (counts & ((1 << _INT32_BITS) - 1)).astype(np.int32)
  high = (counts >> _INT32_BITS).astype(np.int32)
  low, high = (np.asarray(multihost_utils.process_allgather(part), np.int64).sum(axis=0)
               for part in (low, high))
  return (high << _INT32_BITS) + low


def evaluate(model, variables, config, split=None):
  """Scores `variables` on `split` (default `config.data.eval_split`) by the paper's protocol;
  returns `evaluate.evaluate`'s results dict with the head "paper"."""
  split = split or config.data.eval_split
  progress = metric_writer.CountProgress(f"paper eval {split}", pipeline.num_records(config.data, split))
  batches = iter(pipeline.eval_batches(config.data, split, config.eval.global_batch_size))
  with contextlib.closing(batches):  # grain's read threads stop even when an image fails
    confusion, num_images = stream_confusion(model, variables, config, batches, progress)
  confusion = sum_over_hosts(confusion)
  num_images = int(sum_over_hosts(np.asarray([num_images]))[0])
  return {"split": split, "num_images": num_images, "paper": metrics.segmentation_scores(confusion),
          "all_background_miou": metrics.all_background_miou(confusion)}
