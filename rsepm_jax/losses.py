"""Training losses: classification, segmentation and CAM terms (spec 6, 4.2). jnp, jittable.

Label conventions: CAM channel c is class c + 1 in seeds and masks, 0 is background and
`ignore_index` (255) marks pixels that no loss sees (uncertain seeds, crop padding).
"""
import jax
import jax.numpy as jnp

from rsepm_jax import image_ops


def masked_gap(cams, box):
  """Global average pool over the valid crop box only (spec 4.2, 6.1; DHR's crop_bbox GAP).

  Args:
    cams: float `[B, h, w, C]` CAM logits.
    box: int `[B, 4]` (top, left, bottom, right), exclusive ends, on the CAM grid (map a pixel
      box with `image_ops.scale_box`).

  Returns:
    `[B, C]` mean of each channel inside the box (0 for an empty box).
  """
  mask = image_ops.box_mask(box, cams.shape[1:3]).astype(cams.dtype)[..., None]
  count = jnp.maximum(mask.sum(axis=(1, 2)), 1)
  return (cams * mask).sum(axis=(1, 2)) / count


def multilabel_soft_margin(logits, labels):
  """`torch.nn.MultiLabelSoftMarginLoss` (spec 6.1): BCE-with-logits, mean over classes then batch.

  Args:
    logits: float `[B, C]`.
    labels: `[B, C]` targets in [0, 1] (multi-hot, or Saliency Grafting's calibrated soft labels).

  Returns:
    float32 scalar. Uses log-sigmoid, so it stays finite for any finite logit.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  per_class = -(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))
  return per_class.mean()


def _check_dense_target(fn_name, logits, target):
  if logits.shape[:-1] != target.shape:
    raise ValueError(
        f"{fn_name}: target shape {target.shape} must equal the logits' shape without the "
        f"class axis, {logits.shape[:-1]} (logits {logits.shape}).")


def segmentation_cross_entropy(logits, target, ignore_index=255):
  """`CrossEntropyLoss(ignore_index=255)` over pixels (spec 6.1).

  Args:
    logits: float `[B, h, w, K]`.
    target: int `[B, h, w]`, classes in `[0, K)` or `ignore_index`.
    ignore_index: target value that is not counted.

  Returns:
    float32 scalar: mean over the non-ignored pixels; 0 (with zero gradient) when all are ignored.
  """
  _check_dense_target("segmentation_cross_entropy", logits, target)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = target != ignore_index
  safe_target = jnp.where(valid, target, 0).astype(jnp.int32)
  target_log_prob = jnp.take_along_axis(log_probs, safe_target[..., None], axis=-1)[..., 0]
  total = -jnp.where(valid, target_log_prob, 0.0).sum()
  return total / jnp.maximum(valid.sum(), 1)


def cam_loss(cams, seed, kind="bce", bg_logit=0.0, ignore_index=255):
  """Pixel loss tying the CAM branch to the RecurSeed seed (spec 6.2 proposal, 4.2).

  Args:
    cams: float `[B, h, w, C]` CAM logits already on the seed grid.
    seed: int `[B, h, w]`: 0 background, c + 1 for CAM channel c, `ignore_index` ignored
      (uncertain pixels and crop padding).
    kind: "bce": per-class BCE on sigmoid(cams), target 1 where seed == c + 1 and 0 where the
      seed is background or another class, mean over valid pixels and classes. "ce": softmax
      cross entropy on `[bg_logit; cams]` (class 0 = the constant background logit).
    bg_logit: the fixed background logit of kind "ce".
    ignore_index: seed value that is not counted.

  Returns:
    float32 scalar; 0 when every pixel is ignored.
  """
  _check_dense_target("cam_loss", cams, seed)
  cams = cams.astype(jnp.float32)
  if kind == "ce":
    background = jnp.full(cams.shape[:-1] + (1,), bg_logit, jnp.float32)
    return segmentation_cross_entropy(
        jnp.concatenate([background, cams], axis=-1), seed, ignore_index)
  if kind != "bce":
    raise ValueError(f"cam_loss: kind must be 'bce' or 'ce', got {kind!r}.")
  num_classes = cams.shape[-1]
  valid = seed != ignore_index
  target = (seed[..., None] == jnp.arange(1, num_classes + 1)).astype(jnp.float32)
  per_class = -(target * jax.nn.log_sigmoid(cams) + (1 - target) * jax.nn.log_sigmoid(-cams))
  total = jnp.where(valid[..., None], per_class, 0.0).sum()
  return total / (jnp.maximum(valid.sum(), 1) * num_classes)
