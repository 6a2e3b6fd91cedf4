"""Segmentation metrics: confusion counts, mIoU / FP / FN and the CAM threshold sweep (spec 8.2).

Two halves:

* Device side (jnp, jittable, batched): `confusion_matrix`, `cam_threshold_predictions` and
  `threshold_sweep_confusions` count pixels of one batch into **int32** matrices. int32 keeps
  them jit-friendly without `jax_enable_x64` and cannot overflow within one batch. They count
  with a scatter (`jnp.bincount`), which needs the project's Auto-axis mesh
  (`parallel.make_mesh`); under an Explicit-axis mesh the scatter's output sharding is ambiguous.
* Host side (numpy): `accumulate` sums batch counts over a split in **int64** (dataset-level
  counts overflow int32 on COCO-size sets), then `segmentation_scores` / `best_threshold` turn
  the totals into scores and `format_table` prints them.

Convention: rows are ground truth, columns are prediction; class 0 is background and CAM
channel c is class c + 1.
"""
import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred, gt, num_classes, ignore_index=255, valid=None):
  """Pixel confusion counts of one batch (spec 8.2); jittable with static `num_classes`.

  Args:
    pred: int `[...]` predicted class per pixel. Must lie in `[0, num_classes)`: a value
      outside that range is a bug upstream and is not checked (it would be counted in a
      neighbouring cell, or dropped when past the last cell).
    gt: int `[...]` (same shape) ground-truth class, in `[0, num_classes)` or `ignore_index`.
    num_classes: K, background included.
    ignore_index: gt value of pixels that are not counted.
    valid: optional bool `[...]`; pixels where it is False are not counted either (e.g. the
      padded entries of a last, partial batch).

  Returns:
    int32 `[K, K]` jax array, `[gt class, predicted class]`. Sum batches with `accumulate`.
  """
  pred = jnp.asarray(pred)
  gt = jnp.asarray(gt)
  if pred.shape != gt.shape:
    raise ValueError(f"confusion_matrix: pred shape {pred.shape} != gt shape {gt.shape}.")
  counted = gt != ignore_index
  if valid is not None:
    valid = jnp.asarray(valid)
    if valid.shape != gt.shape:
      raise ValueError(f"confusion_matrix: valid shape {valid.shape} != gt shape {gt.shape}.")
    counted &= valid.astype(bool)
  cell = gt.astype(jnp.int32) * num_classes + pred.astype(jnp.int32)
  # bincount clips negative indices to 0, so uncounted pixels go to cell 0 with weight 0.
  cell = jnp.where(counted, cell, 0)
  counts = jnp.bincount(
      cell.ravel(), weights=counted.ravel().astype(jnp.int32), length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def accumulate(total, batch_confusion):
  """Host-side `total + batch_confusion` in int64 (any matching shape, e.g. `[K, K]`, `[T, K, K]`).

  `total` starts as `np.zeros(shape, np.int64)`; `batch_confusion` is a device or numpy array.
  """
  batch_confusion = np.asarray(jax.device_get(batch_confusion), np.int64)
  if np.shape(total) != batch_confusion.shape:
    raise ValueError(
        f"accumulate: total shape {np.shape(total)} != batch_confusion shape "
        f"{batch_confusion.shape}.")
  return np.asarray(total, np.int64) + batch_confusion


def _ratio(numerator, denominator):
  """numerator / denominator, NaN where the denominator is 0."""
  return np.divide(numerator, denominator, out=np.full_like(numerator, np.nan),
                   where=denominator > 0)


def _nanmean(values):
  """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
  present = ~np.isnan(values)
  return float(values[present].mean()) if present.any() else float("nan")


def segmentation_scores(confusion):
  """IoU, mIoU, FP and FN from confusion counts (spec 8.2).

  Per class c with P_c predicted, T_c ground-truth and TP_c true-positive pixels and
  union_c = T_c + P_c - TP_c: IoU_c = TP_c / union_c, FP_c = (P_c - TP_c) / union_c,
  FN_c = (T_c - TP_c) / union_c, so IoU_c + FP_c + FN_c = 1. Classes with union_c = 0 are NaN
  and skipped in the means.

  Args:
    confusion: int `[K, K]`, rows ground truth, columns prediction.

  Returns:
    dict with "miou" (mean IoU over all classes, background included), "iou" float64 `[K]`,
    "fp" / "fn" (means over the foreground classes 1..K-1 only), "fp_per_class",
    "fn_per_class" float64 `[K]`.
  """
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"segmentation_scores: confusion must be [K, K], got {confusion.shape}.")
  true_positive = np.diag(confusion)
  gt_count = confusion.sum(axis=1)
  pred_count = confusion.sum(axis=0)
  union = gt_count + pred_count - true_positive
  iou = _ratio(true_positive, union)
  fp_per_class = _ratio(pred_count - true_positive, union)
  fn_per_class = _ratio(gt_count - true_positive, union)
  return {
      "miou": _nanmean(iou),
      "iou": iou,
      "fp": _nanmean(fp_per_class[1:]),
      "fn": _nanmean(fn_per_class[1:]),
      "fp_per_class": fp_per_class,
      "fn_per_class": fn_per_class,
  }


def all_background_miou(confusion):
  """mIoU of the trivial prediction "background everywhere" on the ground truth of `confusion`.

  The baseline every result should be compared with: only the ground-truth counts (row sums)
  of `confusion` `[K, K]` are used.
  """
  confusion = np.asarray(confusion)
  trivial = np.zeros_like(confusion)
  trivial[:, 0] = confusion.sum(axis=1)
  return segmentation_scores(trivial)["miou"]


def cam_threshold_predictions(scores, labels, thresholds):
  """Label maps from normalised CAMs and a constant background score (spec 8.2, A.6).

  For each threshold th the prediction is `argmax([th, scores restricted to the image's GT
  classes])`: class c + 1 where the best present class scores strictly above th, else 0
  (background wins ties, as the first entry of an argmax does). Classes absent from `labels`
  are never predicted; an image without labels is all background.

  Args:
    scores: float `[B, h, w, C]` per-class maps, normalised to [0, 1].
    labels: `[B, C]` multi-hot image labels (> 0 means present).
    thresholds: float `[T]` background scores.

  Returns:
    int32 `[T, B, h, w]` class indices (0 = background, c + 1 = CAM channel c).
  """
  present = jnp.asarray(labels)[:, None, None, :] > 0
  present_scores = jnp.where(present, scores, -jnp.inf)
  best_score = present_scores.max(axis=-1)
  best_class = present_scores.argmax(axis=-1).astype(jnp.int32) + 1
  thresholds = jnp.asarray(thresholds, best_score.dtype)[:, None, None, None]
  return jnp.where(best_score[None] > thresholds, best_class[None], 0)


def threshold_sweep_confusions(scores, labels, gt, thresholds, num_classes, valid=None,
                               ignore_index=255):
  """Confusion counts of `cam_threshold_predictions` at every threshold (spec 8.2).

  Args:
    scores: float `[B, h, w, C]`; labels: `[B, C]`; thresholds: float `[T]` (as in
      `cam_threshold_predictions`).
    gt: int `[B, h, w]` ground truth at the score resolution (ignore_index ignored).
    num_classes: K = C + 1; static under jit.
    valid: optional bool `[B, h, w]` of pixels to count.
    ignore_index: gt value that is not counted.

  Returns:
    int32 `[T, K, K]`.
  """
  predictions = cam_threshold_predictions(scores, labels, thresholds)
  return jax.vmap(
      lambda pred: confusion_matrix(pred, gt, num_classes, ignore_index, valid))(predictions)


def best_threshold(confusions, thresholds):
  """The threshold with the best mIoU, with its FP and FN (spec 8.2).

  Args:
    confusions: int `[T, K, K]` dataset-level counts, e.g. summed `threshold_sweep_confusions`.
    thresholds: float `[T]`, the thresholds the counts were made with.

  Returns:
    dict with "threshold", "miou", "fp", "fn" of the best threshold (the first one on ties),
    its "index" into `thresholds`, and "per_threshold": a list of such dicts (without
    "index" and "per_threshold"), one per threshold.
  """
  confusions = np.asarray(confusions)
  thresholds = np.asarray(thresholds, np.float64)
  if confusions.ndim != 3 or confusions.shape[0] != thresholds.shape[0]:
    raise ValueError(
        f"best_threshold: confusions must be [T, K, K] with T = len(thresholds) = "
        f"{thresholds.shape[0]}, got {confusions.shape}.")
  per_threshold = []
  for threshold, confusion in zip(thresholds, confusions):
    scores = segmentation_scores(confusion)
    per_threshold.append({"threshold": float(threshold), "miou": scores["miou"],
                          "fp": scores["fp"], "fn": scores["fn"]})
  mious = np.array([row["miou"] for row in per_threshold])
  best = int(np.argmax(np.nan_to_num(mious, nan=-np.inf)))
  return {**per_threshold[best], "index": best, "per_threshold": per_threshold}


def default_thresholds(start=0.10, stop=0.80, step=0.05):
  """Background thresholds `start, start + step, ..., stop` (both ends included; spec 8.2).

  The default gives the 15 values 0.10 ... 0.80 as the nearest float64 of each decimal.
  """
  count = int(round((stop - start) / step)) + 1
  return np.round(start + step * np.arange(count), 6)


def _format_value(value, scale, decimals):
  return "-" if np.isnan(value) else f"{value * scale:.{decimals}f}"


def format_table(scores, class_names):
  """A text table of per-class IoU (%), FP and FN plus the means, from `segmentation_scores`.

  The mean row holds mIoU over all classes and FP / FN over the foreground classes; classes
  absent from both prediction and ground truth show "-".
  """
  num_classes = len(scores["iou"])
  if len(class_names) != num_classes:
    raise ValueError(
        f"format_table: {len(class_names)} class_names for {num_classes} classes in scores.")
  name_width = max(len("mean (FP/FN: fg)"), *(len(name) for name in class_names))
  lines = [f"{'class':<{name_width}}  {'IoU(%)':>7}  {'FP':>6}  {'FN':>6}"]
  rows = zip(class_names, scores["iou"], scores["fp_per_class"], scores["fn_per_class"])
  for name, iou, fp, fn in rows:
    lines.append(f"{name:<{name_width}}  {_format_value(iou, 100, 2):>7}  "
                 f"{_format_value(fp, 1, 3):>6}  {_format_value(fn, 1, 3):>6}")
  lines.append(f"{'mean (FP/FN: fg)':<{name_width}}  {_format_value(scores['miou'], 100, 2):>7}  "
               f"{_format_value(scores['fp'], 1, 3):>6}  {_format_value(scores['fn'], 1, 3):>6}")
  return "\n".join(lines)
