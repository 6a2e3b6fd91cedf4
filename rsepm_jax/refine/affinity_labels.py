"""Affinity labels and loss of IRNet's boundary network (components_spec D.2), NHWC.

Pipeline of the training targets:
  1. `confident_labels`: full-resolution CAMs -> 0 (confident background), 1..C (confident
     foreground), 255 (unsure), from two constant background scores (IRNet conf_fg 0.30,
     conf_bg 0.05; Puzzle-CAM 0.40 / 0.10), optionally each through IRNet's label-mode dense CRF
     (components_spec A.7 step 2, E.2 "IRNet label").
  2. `reduce_labels`: the map at stride 4 as IRNet's PIL nearest rescale by 1/4 samples it.
  3. `pair_labels`: for every source pixel of `random_walk.crop_pairs` and forward direction of
     `random_walk.directions(radius)`, whether the pair is a background positive, a foreground
     positive or a negative.
  4. `affinity_loss` on `crop_pairs(edge_to_affinity(sigmoid(edge_logits), radius), radius)`;
     `edge_loss` does 4 from the logits and the stride-4 labels.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rsepm_jax.refine import crf
from rsepm_jax.refine import random_walk

IGNORE = 255
_EPS = 1e-5
# IRNet's `crf_inference_label`: pydensecrf Gaussian sxy 3 / compat 3, bilateral sxy 50 /
# srgb 5 / compat 10, unary_from_labels(gt_prob, zero_unsure=False).
LABEL_CRF = dict(pos_w=3.0, pos_xy_std=3.0, bi_w=10.0, bi_xy_std=50.0, bi_rgb_std=5.0)


class PairLabels(NamedTuple):
  """Float32 0/1 masks `[B, D, h - r + 1, w - 2r + 2]` (see `pair_labels`)."""
  pos_bg: jax.Array
  pos_fg: jax.Array
  neg: jax.Array


def label_crf(images, labels, tags, num_iter, gt_prob=0.7):
  """IRNet's label-mode dense CRF (`LABEL_CRF`) on uint8 RGB `images [B, H, W, 3]`: `labels
  [B, H, W]` in 0..C with the image `tags [B, C]` -> refined labels in 0..C."""
  num_labels = tags.shape[-1] + 1
  present = jnp.concatenate([jnp.ones_like(tags[:, :1]), tags], axis=-1).astype(jnp.float32)
  count = present.sum(axis=-1)[:, None, None, None]  # background + the tagged classes
  chosen = jax.nn.one_hot(labels, num_labels, dtype=jnp.float32)
  other = (1.0 - gt_prob) / jnp.maximum(count - 1.0, 1.0)
  probs = (chosen * gt_prob + (1.0 - chosen) * other) * present[:, None, None, :]
  q = crf.dense_crf_batch(images, probs, num_iter, **LABEL_CRF)
  return jnp.argmax(q, axis=-1)


def confident_labels(scores, fg_th=0.30, bg_th=0.05, images=None, tags=None, crf_iters=10,
                     gt_prob=0.7):
  """Confident foreground / background labels from CAMs (IRNet `cam_to_ir_label`).

  fg = argmax([fg_th, scores]) and bg = argmax([bg_th, scores]) (0 = the constant background,
  c + 1 = class c; the background wins ties), each optionally refined by the label CRF; then
  label = fg where fg > 0, 0 where fg = bg = 0, 255 elsewhere.

  Args:
    scores: [B, H, W, C] foreground CAMs, max-normalised per class, 0 for absent classes.
    fg_th, bg_th: background scores of the two argmaxes (fg_th > bg_th).
    images: optional [B, H, W, 3] uint8 RGB; when given, both label maps go through IRNet's
      label-mode dense CRF (`LABEL_CRF`, `crf_iters` mean-field iterations, `gt_prob`).
    tags: [B, C] bool image-level classes, required with `images`: IRNet's CRF has one label per
      tagged class plus background (unary (1 - gt_prob) / (n - 1) on the others); here the
      untagged classes keep probability 0 (clipped to 1e-5 by `crf.dense_crf`), a close match.
    crf_iters, gt_prob: label CRF settings (IRNet: 10 and 0.7).

  Returns:
    [B, H, W] int32 labels in {0, 1..C, 255}.
  """
  if scores.ndim != 4:
    raise ValueError(f"affinity_labels.confident_labels: scores must be [B, H, W, C], got "
                     f"{scores.shape}.")
  if images is not None and (tags is None or tags.shape != (scores.shape[0], scores.shape[-1])):
    raise ValueError("affinity_labels.confident_labels: the CRF (images given) needs tags "
                     f"[B, C] = {(scores.shape[0], scores.shape[-1])}, got "
                     f"{None if tags is None else tags.shape}.")

  def argmax_with(threshold):
    background = jnp.full(scores.shape[:3] + (1,), threshold, scores.dtype)
    labels = jnp.argmax(jnp.concatenate([background, scores], axis=-1), axis=-1)
    if images is not None:
      labels = label_crf(images, labels, tags, crf_iters, gt_prob)
    return labels.astype(jnp.int32)

  fg = argmax_with(fg_th)
  bg = argmax_with(bg_th)
  return jnp.where(fg > 0, fg, jnp.where(bg == 0, 0, IGNORE))


def reduce_labels(labels, stride=4):
  """Nearest downsampling of `[B, H, W]` labels as PIL does it (IRNet `pil_rescale`, order 0).

  The output is round(H / stride) x round(W / stride); output cell i reads input pixel
  floor((i + 0.5) H / h_out), i.e. stride * i + stride // 2 when stride divides H.
  """
  height, width = labels.shape[1:]
  out_h, out_w = int(np.round(height / stride)), int(np.round(width / stride))
  rows = np.minimum(np.floor((np.arange(out_h) + 0.5) * height / out_h), height - 1)
  cols = np.minimum(np.floor((np.arange(out_w) + 0.5) * width / out_w), width - 1)
  return labels[:, rows.astype(np.int32)][:, :, cols.astype(np.int32)]


def pair_labels(labels, radius=10):
  """Pair targets of IRNet's affinity loss.

  Sources are the pixels kept by `random_walk.crop_pairs` (rows y < h - (r - 1), columns
  r - 1 <= x < w - (r - 1), IRNet's `PathIndex` crop), so every neighbour (y + dy, x + dx),
  (dy, dx) in `random_walk.directions(radius)`, is inside the map. A pair is valid when both
  labels are < 255; valid pairs with equal labels are positives (background when the label is
  0, foreground otherwise), valid pairs with different labels negatives.

  Args:
    labels: [B, h, w] int labels at stride 4 (0 background, c foreground, 255 ignore).
    radius: static int (IRNet training: 10).

  Returns:
    `PairLabels` of float32 [B, D, h - r + 1, w - 2r + 2].
  """
  height, width = labels.shape[1:]
  margin = radius - 1
  source = random_walk.crop_pairs(labels, radius)[:, None]  # [B, 1, h', w']
  target = jnp.stack(
      [labels[:, dy:dy + height - margin, margin + dx:margin + dx + width - 2 * margin]
       for dy, dx in random_walk.directions(radius)], axis=1)
  valid = (source < IGNORE) & (target < IGNORE)
  positive = valid & (source == target)
  return PairLabels(pos_bg=(positive & (source == 0)).astype(jnp.float32),
                    pos_fg=(positive & (source > 0)).astype(jnp.float32),
                    neg=(valid & (source != target)).astype(jnp.float32))


def _masked_mean(values, mask):
  """IRNet's sum(mask * values) / (sum(mask) + 1e-5): 0 when the mask is empty."""
  return jnp.sum(mask * values) / (jnp.sum(mask) + _EPS)


def affinity_loss(affinity, pairs):
  """IRNet's affinity loss (1/2 L_bg+ + 1/2 L_fg+ + L_neg) / 2.

  Args:
    affinity: [B, D, h', w'] affinities in [0, 1] on the `pair_labels` grid.
    pairs: `PairLabels` of the same shape.

  Returns:
    Scalar float32: L_+ = mean over positives of -log(a + 1e-5), L_neg = mean over negatives of
    -log(1 + 1e-5 - a), each mean over the whole batch (0 without pairs).
  """
  if affinity.shape != pairs.neg.shape:
    raise ValueError(f"affinity_labels.affinity_loss: affinity {affinity.shape} and pair labels "
                     f"{pairs.neg.shape} differ.")
  positive = -jnp.log(affinity + _EPS)
  negative = -jnp.log(1.0 + _EPS - affinity)
  pos_loss = 0.5 * _masked_mean(positive, pairs.pos_bg) + 0.5 * _masked_mean(positive,
                                                                           pairs.pos_fg)
  return (pos_loss + _masked_mean(negative, pairs.neg)) / 2


def edge_loss(edge_logits, labels, radius=10):
  """`affinity_loss` of boundary logits `[B, h, w]` against stride-4 labels `[B, h, w]`."""
  if edge_logits.shape != labels.shape:
    raise ValueError(f"affinity_labels.edge_loss: edge logits {edge_logits.shape} and labels "
                     f"{labels.shape} must be on the same grid.")
  affinity = random_walk.edge_to_affinity(jax.nn.sigmoid(edge_logits.astype(jnp.float32)), radius)
  return affinity_loss(random_walk.crop_pairs(affinity, radius), pair_labels(labels, radius))
