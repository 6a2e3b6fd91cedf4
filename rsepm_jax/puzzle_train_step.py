"""Puzzle-CAM's training step (Jo & Yu, ICIP 2021): `config.method = "puzzlecam"`.

`(state, batch, rng) -> (state, metrics)`, one `jax.jit(jax.shard_map(...))` over the 1-D "data"
mesh like `train_step.make_train_step`, with the same state, optimiser groups, EMA and non-finite
guard (`train_step.apply_gradients`). The network is the CAM classifier (`RSEPMNet` without its
decoder). Per step:

  F    = f(x)                      CAM logits of the crops, [B, h, w, C]
  F_re = merge(f(tile(x)))         the 2x2 tiles of every crop (4B images of S/2) in a second
                                   pass, their CAMs put back in place
  L    = cls L_cls(F) + pcls L_pcls(F_re) + alpha(t) L_re(F, F_re)

L_cls and L_pcls are the multi-label soft margin of the CAM's average inside the crop box (as
RS+EPM's L_cls; the official GAP also averages the padding); L_re is the L1 distance of the two
maps on the image's tagged classes, averaged over every (b, y, x, c) (absent classes count as
zeros), on the raw logits or (`puzzle.re_level = "cam"`) the relu, max-normalised CAMs. alpha
rises linearly from 0 to `alpha_max` at `alpha_ramp` of the schedule. No gradient is stopped.

BatchNorm: each pass normalises with its own batch statistics (synchronised over the mesh, where
the official DataParallel kept them per GPU) and the tile pass continues the running statistics
of the first, so they move twice per step as in the official code.
"""
import dataclasses

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rsepm_jax import optimizer
from rsepm_jax import train_step
from rsepm_jax.models import rsepm
from rsepm_jax.parallel import DATA_AXIS

METHODS = ("rsepm", "puzzlecam")  # config.method
RE_LEVELS = ("feature", "cam")  # config.puzzle.re_level


@dataclasses.dataclass(frozen=True)
class PuzzleSettings:
  """`config.puzzle`: loss weights and the reconstruction loss (components spec A.3)."""
  cls: float = 1.0  # weight of L_cls (the crops' CAM)
  pcls: float = 1.0  # weight of L_pcls (the merged tile CAMs)
  alpha_max: float = 4.0  # the weight of L_re reaches this ...
  alpha_ramp: float = 0.5  # ... at this fraction of the schedule
  re_level: str = "feature"  # L_re on the raw logits | "cam": relu, max-normalised

  def __post_init__(self):
    if self.re_level not in RE_LEVELS:
      raise ValueError(f"puzzle.re_level={self.re_level!r}; expected one of {RE_LEVELS}.")
    for name in ("cls", "pcls", "alpha_max"):
      if getattr(self, name) < 0:
        raise ValueError(f"puzzle.{name}={getattr(self, name)}; expected >= 0.")
    if self.alpha_ramp <= 0:
      raise ValueError(f"puzzle.alpha_ramp={self.alpha_ramp}; expected > 0 (a fraction of the "
                       "schedule).")


def puzzle_settings(config):
  return PuzzleSettings(**config.puzzle.to_dict())


def tile(images):
  """The 2x2 tiles of each image on the batch axis: `[B, H, W, K] -> [4B, H/2, W/2, K]`.

  Row-major tiles (top-left, top-right, bottom-left, bottom-right); tile t of image b sits at
  batch index t * B + b (the official `tile_features`).
  """
  batch, height, width, channels = images.shape
  if height % 2 or width % 2:
    raise ValueError(f"tile: height and width must be even, got {(height, width)}.")
  blocks = images.reshape(batch, 2, height // 2, 2, width // 2, channels)
  return blocks.transpose(1, 3, 0, 2, 4, 5).reshape(4 * batch, height // 2, width // 2, channels)


def merge(tiles, batch):
  """The inverse of `tile`: `[4B, h, w, K] -> [B, 2h, 2w, K]`."""
  count, height, width, channels = tiles.shape
  if count != 4 * batch:
    raise ValueError(f"merge: expected 4 x {batch} tiles, got {count}.")
  blocks = tiles.reshape(2, 2, batch, height, width, channels)
  return blocks.transpose(2, 0, 3, 1, 4, 5).reshape(batch, 2 * height, 2 * width, channels)


def reconstruction_loss(cams, merged, labels, level="feature"):
  """L_re: mean over (b, y, x, c) of |F - F_re| * labels[b, c] (spec A.3, "masking").

  cams, merged: `[B, h, w, C]` CAM logits of the crops and of their merged tiles.
  labels: `[B, C]` tags. `level="cam"` compares `rsepm.normalized_cam` of both instead.
  """
  if level == "cam":
    cams, merged = rsepm.normalized_cam(cams), rsepm.normalized_cam(merged)
  return jnp.mean(jnp.abs(cams - merged) * labels[:, None, None, :])


def alpha(step, total_steps, settings):
  """The weight of L_re at 0-based `step`: min(alpha_max * step / (total_steps * ramp), alpha_max)."""
  ramp_steps = total_steps * settings.alpha_ramp
  return jnp.minimum(settings.alpha_max * step / ramp_steps, settings.alpha_max)


def make_train_step(model, tx, config, mesh, total_steps, steps_per_epoch):
  """Returns the jitted Puzzle-CAM step of `model` (an `RSEPMNet` without decoder); `state` is
  donated. `steps_per_epoch` is unused (no phases); the signature is `train_step`'s."""
  del steps_per_epoch
  settings = puzzle_settings(config)
  stride = train_step.cam_stride(config)
  schedule = optimizer.poly_schedule(config.optim.lr, total_steps, config.optim.poly_power)

  def compute_loss(params, batch_stats, batch, step):
    images = train_step.model_inputs(batch)
    if images.shape[1] % (2 * stride) or images.shape[2] % (2 * stride):
      raise ValueError(f"Puzzle-CAM: the crop {images.shape[1:3]} must be a multiple of twice the "
                       f"CAM stride ({2 * stride}) for the merged tile CAMs to align.")
    outputs, mutated = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                   train=True, mutable=["batch_stats"])
    tile_outputs, mutated = model.apply({"params": params, "batch_stats": mutated["batch_stats"]},
                                        tile(images), train=True, mutable=["batch_stats"])
    merged = merge(tile_outputs["cams"], images.shape[0])
    labels = batch["labels"].astype(jnp.float32)
    terms = {
        "cls": train_step.cls_loss(outputs, labels, batch["crop_box"], stride),
        "pcls": train_step.cls_loss({"cams": merged}, labels, batch["crop_box"], stride),
        "re": reconstruction_loss(outputs["cams"], merged, labels, settings.re_level),
    }
    weight = alpha(step, total_steps, settings)
    total = settings.cls * terms["cls"] + settings.pcls * terms["pcls"] + weight * terms["re"]
    return lax.pmean(total, DATA_AXIS), (terms, mutated["batch_stats"], weight)

  def step(state, batch, rng):
    del rng  # the classifier has no dropout
    (loss, (terms, batch_stats, weight)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state["params"], state["batch_stats"], batch, state["step"])
    new_state, metrics = train_step.apply_gradients(state, loss, grads, batch_stats, terms, tx,
                                                    config.optim, schedule)
    return new_state, {**metrics, "alpha": weight}

  sharded = jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=0)
