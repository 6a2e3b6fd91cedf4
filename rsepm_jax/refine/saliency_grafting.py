"""Saliency Grafting of a partner into a target (Park et al., AAAI 2022), adapted to WSSS.

A reconstruction: the paper mixes classification images with a gradient saliency; here the
saliency comes from the CAM and the grafted region also carries the partner's seed. On the seed
grid (h, w), for target i and partner j (`MixSettings` fields in brackets):

    s_b    = relu(CAM_b) max over b's tagged classes, bilinear to (h, w), divided by its maximum
             over the valid cells (inside the crop box); 0 outside them
    S_b    = softmax of s_b / T over the valid cells [sg_temperature = T]; T = 0: S_b = s_b
    cand   = valid cells of j with S_j > t * (mean of S_j over its valid cells) [sg_threshold = t]
    M      = cand on the square patches of p cells kept by Bernoulli(q) [sg_patch, sg_keep_prob]
    lambda = sum(S_j M) / (sum(S_j M) + sum(S_i (1 - M)))      (the paper's calibrated mixing)
    y_mix  = y_i + lambda (y_j - y_i), y_j = j's tags | the classes pasted [sg_label_mixing]

The caller pastes `x_j` and `seed_j` on M. A candidate has S_j > 0, so lambda > 0 as soon as
anything is pasted: every pasted class gets a label > 0.
"""
import jax
import jax.numpy as jnp

from rsepm_jax import image_ops


def saliency(cams, labels, valid, temperature):
  """Normalised CAM saliency on the grid of `valid`.

  Args:
    cams: [B, hc, wc, C] raw CAMs.
    labels: [B, C] tags; only tagged classes count.
    valid: bool [B, h, w] cells inside the crop box.
    temperature: > 0: a softmax over the valid cells (sums to 1); 0: divided by the maximum.

  Returns:
    float32 [B, h, w], 0 outside `valid` (and everywhere for an image without positive CAM).
  """
  tagged = jnp.where(labels[:, None, None, :] > 0, jax.nn.relu(cams.astype(jnp.float32)), 0.0)
  raw = image_ops.resize_bilinear(jnp.max(tagged, axis=-1, keepdims=True), valid.shape[1:])[..., 0]
  raw = jnp.where(valid, raw, 0.0)
  scaled = raw / jnp.maximum(jnp.max(raw, axis=(1, 2), keepdims=True), 1e-12)  # in [0, 1]
  if temperature == 0:
    return scaled
  weights = jnp.where(valid, jnp.exp((scaled - 1.0) / temperature), 0.0)
  return weights / jnp.maximum(jnp.sum(weights, axis=(1, 2), keepdims=True), 1e-30)


def graft_mask(keys, partner_saliency, valid, settings):
  """M: the salient cells of the partner on randomly kept patches.

  Args:
    keys: [B] PRNG keys, one per image (the patch draws).
    partner_saliency: float [B, h, w] from `saliency`.
    valid: bool [B, h, w] the partner's cells inside its crop box.
    settings: `MixSettings` (sg_threshold, sg_patch, sg_keep_prob).

  Returns:
    bool [B, h, w].
  """
  height, width = valid.shape[1:]
  count = jnp.maximum(jnp.sum(valid, axis=(1, 2), keepdims=True), 1)
  mean = jnp.sum(partner_saliency, axis=(1, 2), keepdims=True) / count
  candidates = valid & (partner_saliency > settings.sg_threshold * mean)
  patch = settings.sg_patch
  grid = (-(-height // patch), -(-width // patch))
  kept = jax.vmap(lambda key: jax.random.bernoulli(key, settings.sg_keep_prob, grid))(keys)
  kept = jnp.repeat(jnp.repeat(kept, patch, axis=1), patch, axis=2)[:, :height, :width]
  return candidates & kept


def calibrated_lambda(target_saliency, partner_saliency, mask):
  """lambda [B] = sum(S_j M) / (sum(S_j M) + sum(S_i (1 - M))); 0 when both sums are 0."""
  pasted = jnp.sum(jnp.where(mask, partner_saliency, 0.0), axis=(1, 2))
  kept = jnp.sum(jnp.where(mask, 0.0, target_saliency), axis=(1, 2))
  return pasted / jnp.maximum(pasted + kept, 1e-30)


def calibrated_labels(labels, partner_labels, lam):
  """y_i + lambda (y_j - y_i) per class: the paper's (1 - lambda) y_i + lambda y_j, in [0, 1].

  A class tagged in both images keeps 1 (an element-wise max of the two weighted labels would
  give it max(lambda, 1 - lambda) < 1 although it is certainly present), and a self-mix keeps
  its labels exactly.

  Args:
    labels, partner_labels: float [B, C] in [0, 1].
    lam: float [B].

  Returns:
    float32 [B, C].
  """
  labels, partner_labels = (x.astype(jnp.float32) for x in (labels, partner_labels))
  return labels + lam[:, None] * (partner_labels - labels)
