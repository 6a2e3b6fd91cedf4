"""RecurSeed pseudo masks (spec 4.2, a reconstruction: every choice is a field of `Settings`).

    source  = normalised CAM x tags (warm-up) or the decoder's foreground probabilities x tags
    repeat `rounds` times (lax.scan):
        expanded = SCG(source, features) x tags             # fewer non-detections (spec 2)
        P        = [(1 - max_c expanded)^gamma, expanded]    # at the mask grid (stride 4)
        P        = PAMR(image, P)                            # fewer false detections (spec 3)
        source   = P[..., 1:] back on the SCG grid
    seed = confidence filter: label argmax_c P_c; foreground where the filter input is
           confident, 0 where it is surely background, else 255; 255 outside the crop box.
           The filter input is the source (spec 4.2: max_c S_c) or the refined P.

Everything runs under `stop_gradient`; nothing here has parameters.
"""
import dataclasses
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from rsepm_jax import image_ops
from rsepm_jax.refine import pamr as pamr_lib
from rsepm_jax.refine import scg as scg_lib

IGNORE = 255


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static RecurSeed knobs; defaults are the spec's values."""
  scg_levels: Sequence[str] = ("C4", "C5")  # backbone features for SCG, on the CAM grid
  first_th: float = 0.5  # SCG first-order threshold tau1
  second_th: float = 0.1  # SCG second-order threshold tau2 (times 1/N)
  fg_th: float = 0.3  # SCG foreground seed threshold
  bg_th: float = 0.05  # SCG background seed threshold
  scg_iterations: int = 1  # SCG extra random-walk products (1 = second order, spec 2.1)
  scg_second_weight: float = 1.0  # SCG lambda in max(first order, lambda * second order)
  bg_gamma: float = 2.0  # background = (1 - max fg)^gamma
  pamr_iter: int = 10  # PAMR propagation steps
  pamr_dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)  # PAMR neighbourhood dilations
  pamr_sigma: float = 0.1  # PAMR affinity scale
  certain: float = 0.55  # confidence filter: foreground at or above this
  uncertain: float = 0.10  # confidence filter: background at or below this
  confidence_rule: str = "threshold"  # threshold (max fg) | margin (top-1 minus top-2)
  filter_input: str = "refined"  # confidence filter reads the refined P | the source S (spec 4.2)
  rounds: int = 1  # SCG -> PAMR rounds per step
  use_scg: bool = True  # ablation switch
  use_pamr: bool = True  # ablation switch
  normalize_decoder_source: bool = False  # per-class max-normalise the decoder source
  # The decoder source comes from the training forward pass, dropout on (True), or from the
  # decoder head re-run on the same features without dropout (False; done by the train step).
  decoder_source_dropout: bool = False

  def __post_init__(self):
    if self.confidence_rule not in ("threshold", "margin"):
      raise ValueError(f"confidence_rule={self.confidence_rule!r}; expected 'threshold' or 'margin'.")
    if self.filter_input not in ("source", "refined"):
      raise ValueError(f"filter_input={self.filter_input!r}; expected 'source' or 'refined'.")
    if self.rounds < 1:
      raise ValueError(f"rounds={self.rounds}; expected at least 1.")


def max_normalize(scores):
  """`[B, H, W, C]` maps divided per image and channel by their spatial maximum (+1e-5)."""
  return scores / (jnp.max(scores, axis=(1, 2), keepdims=True) + 1e-5)


def cam_source(cams, labels):
  """Normalised CAM of the tagged classes: `[B, h, w, C]` in [0, 1]."""
  return max_normalize(jax.nn.relu(cams)) * labels[:, None, None, :]


def decoder_source(seg_logits, labels, size, normalize=True):
  """Decoder foreground probabilities `[B, *size, C]` of the tagged classes (spec 4.2, 8.1)."""
  foreground = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)[..., 1:]
  foreground = image_ops.resize_bilinear(foreground, size)
  if normalize:
    foreground = max_normalize(foreground)
  return foreground * labels[:, None, None, :]


def scg_features(features, levels, size):
  """The named backbone features, float32, resized (bilinear) to the SCG grid `size`."""
  missing = [name for name in levels if name not in features]
  if missing:
    raise KeyError(f"SCG feature levels {missing} not among the model features {sorted(features)}.")
  return [image_ops.resize_bilinear(features[name].astype(jnp.float32), size) for name in levels]


def with_background(foreground, gamma):
  """`[B, H, W, C]` -> `[B, H, W, C + 1]` with background `(1 - max_c fg)^gamma` first."""
  background = jnp.power(jnp.clip(1.0 - jnp.max(foreground, axis=-1, keepdims=True), 0.0, 1.0), gamma)
  return jnp.concatenate([background, foreground], axis=-1)


def scg(scores, features, settings):
  """SCG expansion (spec 2.1) of `[B, h, w, C]` scores with the thresholds of `settings`."""
  return scg_lib.scg(scores, features, first_th=settings.first_th, second_th=settings.second_th,
                     fg_th=settings.fg_th, bg_th=settings.bg_th,
                     iterations=settings.scg_iterations, second_weight=settings.scg_second_weight)


def refine(source, features, mask_image, labels, settings):
  """`rounds` of SCG expansion and PAMR refinement.

  Args:
    source: [B, h, w, C] scores in [0, 1] on the SCG grid (absent classes 0).
    features: list of [B, h, w, D] features on the same grid.
    mask_image: [B, H, W, 3] image at the mask grid (any affine scaling).
    labels: [B, C] multi-hot tags.
    settings: `Settings`.

  Returns:
    [B, H, W, C + 1] refined probabilities, background first.
  """
  grid = source.shape[1:3]
  mask_size = mask_image.shape[1:3]
  tags = labels[:, None, None, :]

  def one_round(scores, _):
    if settings.use_scg:
      scores = scg(scores, features, settings) * tags
    probs = with_background(image_ops.resize_bilinear(scores, mask_size), settings.bg_gamma)
    if settings.use_pamr:
      probs = pamr_lib.pamr(mask_image, probs, num_iter=settings.pamr_iter,
                            dilations=tuple(settings.pamr_dilations), sigma=settings.pamr_sigma)
    next_scores = max_normalize(image_ops.resize_bilinear(probs[..., 1:], grid)) * tags
    return next_scores, probs

  _, probs = lax.scan(one_round, source, length=settings.rounds)
  return probs[-1]


def confidence_filter(probs, valid, settings, source=None):
  """Seed labels from refined probabilities (spec 4.2 "CF").

  The label of a pixel is the argmax of `probs`; whether it is kept is decided on the filter
  input: `source` (spec 4.2) when `settings.filter_input == "source"`, else `probs`.
    threshold rule: foreground where max_c input_c >= certain, background where <= uncertain;
    margin rule: kept where top-1 minus top-2 of [bg, input] >= uncertain (the background of a
      source is `(1 - max_c S_c)^bg_gamma`).

  Args:
    probs: [B, H, W, C + 1], background first.
    valid: [B, H, W] bool, False outside the crop.
    settings: `Settings` (certain, uncertain, confidence_rule, filter_input, bg_gamma).
    source: [B, H, W, C] source scores on the same grid; required for `filter_input="source"`.

  Returns:
    int32 [B, H, W]: c + 1 for a confident class c, 0 for confident background, 255 otherwise.
  """
  if settings.filter_input == "source":
    if source is None or source.shape != probs.shape[:3] + (probs.shape[-1] - 1,):
      raise ValueError(f"confidence_filter: filter_input='source' needs source scores of shape "
                       f"{probs.shape[:3] + (probs.shape[-1] - 1,)}, got "
                       f"{None if source is None else source.shape}.")
    gate = with_background(source, settings.bg_gamma)
  else:
    gate = probs
  if settings.confidence_rule == "threshold":
    best_fg = jnp.max(gate[..., 1:], axis=-1)
    seed = jnp.where(best_fg >= settings.certain, jnp.argmax(probs[..., 1:], axis=-1) + 1, IGNORE)
    seed = jnp.where(best_fg <= settings.uncertain, 0, seed)
  else:
    top2 = lax.top_k(gate, 2)[0]
    margin = top2[..., 0] - top2[..., 1]
    seed = jnp.where(margin >= settings.uncertain, jnp.argmax(probs, axis=-1), IGNORE)
  return jnp.where(valid, seed, IGNORE).astype(jnp.int32)


def pseudo_mask(image, cams, seg_logits, features, labels, crop_box, decoder_weight, settings):
  """RecurSeed seed for a training batch, at the decoder grid (stride 4).

  Args:
    image: [B, H, W, 3] normalised input images.
    cams: [B, h, w, C] raw CAM logits (the SCG grid).
    seg_logits: [B, H/4, W/4, C + 1] decoder logits (the decoder source; see
      `Settings.decoder_source_dropout` for which pass the train step passes).
    features: dict of backbone features (`settings.scg_levels` are used).
    labels: [B, C] multi-hot tags.
    crop_box: [B, 4] valid region of the crop in input pixels.
    decoder_weight: scalar in [0, 1]: 0 uses the CAM as source, 1 the decoder (traced, so the
      switch after warm-up does not recompile).
    settings: `Settings`.

  Returns:
    (seed int32 [B, H/4, W/4], probs float32 [B, H/4, W/4, C + 1]).
  """
  image, cams, seg_logits, labels = (
      lax.stop_gradient(x.astype(jnp.float32)) for x in (image, cams, seg_logits, labels))
  features = {k: lax.stop_gradient(v) for k, v in features.items()}
  grid = cams.shape[1:3]
  mask_size = seg_logits.shape[1:3]
  stride = image.shape[1] // mask_size[0]
  source = ((1.0 - decoder_weight) * cam_source(cams, labels)
            + decoder_weight * decoder_source(seg_logits, labels, grid, settings.normalize_decoder_source))
  mask_image = image_ops.resize_bilinear_align_corners(image, mask_size)
  probs = refine(source, scg_features(features, settings.scg_levels, grid), mask_image, labels, settings)
  valid = image_ops.box_mask(image_ops.scale_box(crop_box, stride), mask_size)
  source_on_mask = image_ops.resize_bilinear(source, mask_size)
  return confidence_filter(probs, valid, settings, source_on_mask), probs
