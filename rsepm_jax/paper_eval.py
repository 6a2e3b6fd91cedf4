"""`config.eval.protocol = "paper"`: a network scored as the paper's val protocol (spec 8.1, 8.2).

Per eval image at its own size (the padded record cropped back to its `crop_box`):
`inference.multiscale_many` over `config.inference.scales` (and flips; the images of a batch that
share a size run together), `inference.segment_scores` with the classes of the network's scores
(or the GT tags with `config.eval.gate_by_tags`) and the background of `config.inference` (stage-2
networks: their softmax; CAM-only networks: their A.5 CAMs as seeds, with the same background
rule as the decoder's), then, with `config.eval.crf`, `refine.crf.dense_crf` on the image and
the background + kept-class channels, and the argmax. With `config.eval.seed_sweep`, the same
multi-scale seeds are also scored without CRF against each constant background of the
`eval.cam_threshold_*` sweep, gated by the GT tags (the paper's seed quality on train; for a
CAM-only network, Puzzle-CAM's threshold search, components spec A.6: "fp" / "fn" are means over
the foreground classes, as A.6's evaluate.py).
The confusion matrices are streamed (`metrics.confusion_matrix` per image, accumulated on the
host in int64, GT 255 ignored), each host over its shard of the split, and summed over the
hosts; no per-image scores are kept.
"""
import contextlib

import jax
from jax.experimental import multihost_utils
import numpy as np

from rsepm_jax import evaluate as single_scale_eval
from rsepm_jax import inference
from rsepm_jax import metric_writer
from rsepm_jax import metrics
from rsepm_jax.data import pipeline
from rsepm_jax.refine import crf

PROTOCOLS = ("single", "paper")
_INT32_BITS = 31
_dense_crf = jax.jit(crf.dense_crf)  # one compilation per image size and number of labels


def _refined_label(image, scores, settings, tags, use_crf):
  result = inference.segment_scores(scores, settings, tags)
  if not use_crf or not len(result["keys"]):
    return result["label"]
  labels = np.concatenate([[0], result["keys"] + 1])  # background and the kept classes
  refined = _dense_crf(image, result["probs"][..., labels])
  return labels[np.argmax(np.asarray(refined), axis=-1)].astype(np.uint8)


def predict_labels(model, variables, images, config, tags=None, use_crf=True):
  """uint8 `[H_i, W_i]` labels (0 background, c + 1 class c) of uint8 RGB `[H_i, W_i, 3]`
  `images`, their multi-scale passes batched by size (`inference.multiscale_many`).

  Classes: `tags[i]` (multi-hot `[C]`) when given, else the network's own scores
  (`inference.segment_scores`). `use_crf`: the dense CRF on the image and the background +
  kept-class channels."""
  settings = config.inference
  all_scores = inference.multiscale_config(model, variables, images, settings)
  tags = [None] * len(images) if tags is None else tags
  return [_refined_label(image, scores, settings, image_tags, use_crf)
          for image, scores, image_tags in zip(images, all_scores, tags)]


def predict_label(model, variables, image, config, tags=None, use_crf=True):
  """`predict_labels` of one image."""
  return predict_labels(model, variables, [image], config, None if tags is None else [tags],
                        use_crf)[0]


def seed_sweep_confusions(scores, tags, gt, thresholds, num_classes):
  """int64 `[T, C + 1, C + 1]`: the seeds of `multiscale` outputs (foreground normalised by its
  maximum, GT `tags` only) against `gt [H, W]` with each constant background of `thresholds`."""
  if scores["rule"] == "stage2":
    raise ValueError("config.eval.seed_sweep scores the single-stage seeds; a stage-2 network "
                     "(config.model.arch) has none.")
  seeds = inference.segment(scores["pred_mask"], scores["pred_class"], tags, bg_threshold=0.0)
  return metrics.threshold_sweep_confusions(
      seeds["probs"][None, ..., 1:], np.asarray(tags)[None], gt[None], thresholds, num_classes)


def stream_confusion(model, variables, config, batches, progress=None):
  """Counts over the valid records of host `batches` (`pipeline.eval_batches` dicts: image uint8
  `[b, S, S, 3]`, mask `[b, S, S]`, labels `[b, C]`, crop_box `[b, 4]` = (0, 0, h, w),
  valid `[b]`): {"paper": int64 `[C + 1, C + 1]`, "num_images": int, and with
  `config.eval.seed_sweep` "seeds": int64 `[T, C + 1, C + 1]` over `evaluate.cam_thresholds`}."""
  num_labels = config.data.num_classes + 1
  settings = config.inference
  thresholds = single_scale_eval.cam_thresholds(config.eval)
  counts = {"paper": np.zeros((num_labels, num_labels), np.int64), "num_images": 0}
  if config.eval.seed_sweep:
    counts["seeds"] = np.zeros((len(thresholds), num_labels, num_labels), np.int64)
  for batch in batches:
    images, masks, tags = [], [], []
    for i in np.flatnonzero(batch["valid"]):
      top, left, bottom, right = (int(v) for v in batch["crop_box"][i])
      images.append(np.asarray(batch["image"][i, top:bottom, left:right]))
      masks.append(np.asarray(batch["mask"][i, top:bottom, left:right]))
      tags.append(batch["labels"][i] > 0)
    all_scores = inference.multiscale_config(model, variables, images, settings)
    for image, mask, image_tags, scores in zip(images, masks, tags, all_scores):
      gate = image_tags if config.eval.gate_by_tags else None
      label = _refined_label(image, scores, settings, gate, config.eval.crf)
      counts["paper"] = metrics.accumulate(counts["paper"],
                                           metrics.confusion_matrix(label, mask, num_labels))
      if config.eval.seed_sweep:
        counts["seeds"] = metrics.accumulate(counts["seeds"], seed_sweep_confusions(
            scores, image_tags, mask, thresholds, num_labels))
      counts["num_images"] += 1
    if progress is not None:  # the batches of every host advance together
      progress.advance(config.eval.global_batch_size)
  return counts


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
  returns `evaluate.evaluate`'s results dict with the head "paper" (and "seeds": the best of the
  background sweep, with `config.eval.seed_sweep`)."""
  split = split or config.data.eval_split
  progress = metric_writer.CountProgress(f"paper eval {split}", pipeline.num_records(config.data, split))
  batches = iter(pipeline.eval_batches(config.data, split, config.eval.global_batch_size))
  with contextlib.closing(batches):  # grain's read threads stop even when an image fails
    counts = stream_confusion(model, variables, config, batches, progress)
  counts = {key: sum_over_hosts(value) for key, value in counts.items()}
  results = {"split": split, "num_images": int(counts["num_images"]),
             "paper": metrics.segmentation_scores(counts["paper"]),
             "all_background_miou": metrics.all_background_miou(counts["paper"])}
  if "seeds" in counts:
    best = metrics.best_threshold(counts["seeds"], single_scale_eval.cam_thresholds(config.eval))
    results["seeds"] = {**metrics.segmentation_scores(counts["seeds"][best["index"]]),
                        "threshold": best["threshold"], "per_threshold": best["per_threshold"]}
  return results
