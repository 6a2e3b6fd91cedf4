"""Evaluation of CAM seeds and the decoder on a labelled split (spec 8.2).

CAM seeds: per-class `relu(cam)` upsampled (bilinear, half-pixel) to the image, max-normalised
over the valid image, GT classes only, background by a constant threshold swept over
`config.eval.cam_threshold_*`; the best threshold is reported. Decoder: argmax of the upsampled
`seg_logits` over all C+1 classes (the only head of the DeepLab networks, which have no CAMs).
Confusion matrices are summed on device across the batch (and so across devices and hosts) and
accumulated on the host in int64.
"""
import contextlib
import json

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from rsepm_jax import image_ops
from rsepm_jax import metric_writer
from rsepm_jax import metrics
from rsepm_jax import parallel
from rsepm_jax.data import classes
from rsepm_jax.data import pipeline
from rsepm_jax.data import synthetic
from rsepm_jax.train_step import model_inputs


def cam_thresholds(eval_config):
  """The background thresholds of the CAM sweep, e.g. 0.10, 0.15, ..., 0.80."""
  return metrics.default_thresholds(
      eval_config.cam_threshold_min, eval_config.cam_threshold_max, eval_config.cam_threshold_step)


def upsampled_cam_scores(cams, crop_box, size):
  """Raw CAMs (or other per-class scores) `[B, h, w, C]` -> `[B, H, W, C]` in [0, 1]: relu,
  bilinear to `size`, each channel divided by its maximum inside `crop_box`."""
  scores = image_ops.resize_bilinear(jax.nn.relu(cams), size)
  inside = image_ops.box_mask(crop_box, size)[..., None]
  peak = jnp.max(jnp.where(inside, scores, 0.0), axis=(1, 2), keepdims=True)
  return scores / (peak + 1e-5)


def make_eval_step(model, num_classes, thresholds, mesh):
  """Jitted `(variables, batch) -> {"cam": int32 [T, K, K], "decoder": int32 [K, K], "num_images": int32 []}`
  (summed over the global batch, every host included); "cam" only for a network with CAMs,
  "decoder" only for one with `seg_logits`."""
  num_labels = num_classes + 1

  def eval_step(variables, batch):
    outputs = model.apply(variables, model_inputs(batch), train=False)
    size = batch["image"].shape[1:3]
    gt = batch["mask"].astype(jnp.int32)
    valid = batch["valid"][:, None, None] & (gt != 255)
    confusions = {}
    if "cams" in outputs:  # the DeepLab networks have none
      scores = upsampled_cam_scores(outputs["cams"], batch["crop_box"], size)
      confusions["cam"] = metrics.threshold_sweep_confusions(
          scores, batch["labels"], gt, thresholds, num_labels, valid=valid)
    if "seg_logits" in outputs:
      logits = image_ops.resize_bilinear(outputs["seg_logits"], size)
      confusions["decoder"] = metrics.confusion_matrix(
          jnp.argmax(logits, axis=-1), gt, num_labels, valid=valid)
    confusions["num_images"] = jnp.sum(batch["valid"].astype(jnp.int32))  # over every host
    return confusions

  return jax.jit(eval_step, out_shardings=parallel.replicated(mesh))


def device_eval_batches(config, split, mesh):
  """Yields `(host batch, global batch)` for every eval batch of `split` (the global one without
  the host-side `id`)."""
  batches = iter(pipeline.eval_batches(config.data, split, config.eval.global_batch_size))
  with contextlib.closing(batches):  # grain's read threads stop even when the caller stops early
    for host_batch in batches:
      yield host_batch, parallel.to_global({k: v for k, v in host_batch.items() if k != "id"}, mesh)


def evaluate(model, variables, config, mesh, split=None):
  """Scores `variables` on `split` (default `config.data.eval_split`); returns a results dict."""
  split = split or config.data.eval_split
  thresholds = cam_thresholds(config.eval)
  eval_step = make_eval_step(model, config.data.num_classes, jnp.asarray(thresholds, jnp.float32), mesh)
  parallel.local_batch_size(config.eval.global_batch_size, "config.eval.global_batch_size")
  totals = {}
  num_images = 0
  progress = metric_writer.CountProgress(f"eval {split}", pipeline.num_records(config.data, split))
  for index, (_, batch) in enumerate(device_eval_batches(config, split, mesh)):
    if index == 0:
      eval_step = parallel.compile_on_every_process(eval_step, variables, batch, name="eval_step")
    confusions = eval_step(variables, batch)
    num_images += int(confusions.pop("num_images"))
    progress.advance(config.eval.global_batch_size)
    for name, value in confusions.items():
      totals[name] = metrics.accumulate(totals.get(name, np.zeros(value.shape, np.int64)), value)
  any_confusion = totals["decoder"] if "decoder" in totals else totals["cam"][0]
  results = {
      "split": split,
      "num_images": num_images,
      "all_background_miou": metrics.all_background_miou(any_confusion),
  }
  if "cam" in totals:
    cam = metrics.best_threshold(totals["cam"], thresholds)
    results["cam"] = {**metrics.segmentation_scores(totals["cam"][cam["index"]]),
                      "threshold": cam["threshold"]}
  if "decoder" in totals:
    results["decoder"] = metrics.segmentation_scores(totals["decoder"])
  return results


def class_names(config):
  """("background", C foreground names) of `config.data`: VOC and COCO names (data/classes.py;
  for `array_record` by `data.dataset`), the synthetic shapes, else class_1..class_C."""
  data = config.data
  dataset = data.dataset if data.name == "array_record" else data.name
  if dataset == "synthetic":
    names = synthetic.CLASS_NAMES[:data.num_classes]
  else:
    names = classes.CLASS_NAMES.get(dataset) or [f"class_{i}" for i in range(1, data.num_classes + 1)]
  if len(names) != data.num_classes:
    raise ValueError(f"config.data.num_classes={data.num_classes}, but dataset {dataset!r} has "
                     f"{len(names)} classes (rsepm_jax/data/classes.py).")
  return ("background",) + tuple(names)


def report(results, config, workdir, step):
  """Prints the tables and writes `workdir/eval/step_<step>.json` (`step_<step>_paper.json` for
  `paper_eval` results; process 0 only)."""
  names = class_names(config)
  for head in ("cam", "decoder", "paper", "seeds"):
    if head in results:
      extra = (f" (best background threshold {results[head]['threshold']:.2f})"
               if "threshold" in results[head] else "")
      logging.info("%s mIoU on %s at step %d%s:\n%s", head, results["split"], step, extra,
                   metrics.format_table(results[head], names))
  logging.info("For comparison, predicting background everywhere gives mIoU %.2f%%.",
               100 * results["all_background_miou"])
  if jax.process_index() == 0:
    out_dir = epath.Path(workdir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_paper" if "paper" in results else ""
    (out_dir / f"step_{step}{suffix}.json").write_text(
        json.dumps(jsonable({**results, "class_names": names}), indent=2))


def jsonable(value):
  """Numpy scalars and arrays to plain JSON values, NaN (absent class) to null."""
  if isinstance(value, dict):
    return {k: jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [jsonable(v) for v in np.asarray(value).tolist()]
  if isinstance(value, (float, np.floating)):
    return None if np.isnan(value) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value
