"""PAMR: pixel-adaptive mask refinement (rsepm_spec 3.1, components_spec B.1).

Every pixel's mask becomes a softmax-weighted average of its 8 * len(dilations) dilated 3x3
neighbours (centre excluded, replicate padding). The weights come from image differences scaled
by the local per-channel std and are computed once; the propagation repeats `num_iter` times.

Replicate padding by `d` then shifting by `d` is the same as clamping coordinates, so every
array is edge-padded once by the largest dilation and each neighbour is a static slice of it.
"""
import jax
import jax.numpy as jnp

_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# Mask channels are zero-padded to a multiple of the CPU's float32 vector width: the inner
# channel loop of the propagation then vectorises without a remainder (about 1.5x faster).
_CHANNEL_MULTIPLE = 8


def _neighbour_offsets(dilations, include_centre):
  """(row, col) offsets, dilation by dilation in the given order."""
  directions = _DIRECTIONS + ((0, 0),) if include_centre else _DIRECTIONS
  return [(d * dy, d * dx) for d in dilations for dy, dx in directions]


def _edge_pad(x, pad, spatial_axes):
  """Replicate-pads `x` by `pad` on both sides of each of the two spatial axes."""
  widths = [(0, 0)] * x.ndim
  for axis in spatial_axes:
    widths[axis] = (pad, pad)
  return jnp.pad(x, widths, mode="edge")


def pamr_weights(image, dilations=(1, 2, 4, 8, 12, 24), sigma=0.1):
  """Per-pixel softmax weights over the dilated neighbours (rsepm_spec 3.1, affinity).

  Args:
    image: [B, H, W, 3] float image (any per-channel affine scaling gives the same weights).
    dilations: static sequence of neighbourhood dilations.
    sigma: scale of the local std in the affinity denominator.

  Returns:
    [B, H, W, K] float32 weights, K = 8 * len(dilations) in `_neighbour_offsets` order,
    summing to 1 over K.
  """
  planes = jnp.transpose(image.astype(jnp.float32), (3, 0, 1, 2))  # [3, B, H, W]
  height, width = planes.shape[2:]
  pad = max(dilations)
  padded = _edge_pad(planes, pad, (2, 3))

  def shifted(offset):
    return padded[:, :, pad + offset[0]:pad + offset[0] + height,
                  pad + offset[1]:pad + offset[1] + width]

  # Unbiased std over the 3x3 window of every dilation, centre counted once per dilation.
  window = _neighbour_offsets(dilations, include_centre=True)
  mean = sum(shifted(offset) for offset in window) / len(window)
  variance = sum(jnp.square(shifted(offset) - mean) for offset in window) / (len(window) - 1)
  scale = sigma * jnp.sqrt(variance) + 1e-8

  def affinity(offset):
    # Mean over channels written per channel plane (not jnp.mean over an axis): each
    # neighbour's affinity then compiles to one fused loop on CPU.
    neighbour = shifted(offset)
    return -sum(jnp.abs(planes[c] - neighbour[c]) / scale[c] for c in range(3)) / 3

  # Stacked on the major axis then moved last: stacking on the minor axis directly, or a
  # softmax over a major axis, is 2-3x slower on CPU.
  affinities = jnp.stack(
      [affinity(offset) for offset in _neighbour_offsets(dilations, include_centre=False)])
  return jax.nn.softmax(jnp.moveaxis(affinities, 0, -1), axis=-1)


def pamr(image, masks, num_iter=10, dilations=(1, 2, 4, 8, 12, 24), sigma=0.1):
  """Refines `masks` towards image edges (rsepm_spec 3.1); no gradients flow through it.

  Args:
    image: [B, H, W, 3] float image (normalised or raw: the result is the same up to 1e-8).
    masks: [B, H, W, C] masks or probabilities on the image's grid.
    num_iter: number of propagation steps (static, or traced: it only bounds a fori_loop).
    dilations: static sequence of neighbourhood dilations (8 * len(dilations) neighbours).
    sigma: scale of the local std in the affinity denominator.

  Returns:
    [B, H, W, C] float32 refined masks.
  """
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"pamr: image must be [B, H, W, 3], got shape {image.shape}.")
  if masks.ndim != 4 or masks.shape[:3] != image.shape[:3]:
    raise ValueError(
        f"pamr: masks must be [B, H, W, C] on the image grid {image.shape[:3]}, got {masks.shape}.")
  if not dilations or min(dilations) < 1:
    raise ValueError(f"pamr: dilations must be positive integers, got {dilations}.")
  batch, height, width, num_channels = masks.shape
  weights = pamr_weights(jax.lax.stop_gradient(image), dilations, sigma)
  num_neighbours = weights.shape[-1]
  pad = max(dilations)
  padded_height, padded_width = height + 2 * pad, width + 2 * pad
  num_lanes = -(-num_channels // _CHANNEL_MULTIPLE) * _CHANNEL_MULTIPLE

  # Flat layout: with rows of the padded width, output pixel (y, x) sits at i = y * Wp + x and
  # its neighbour (dy, dx) at i + start(dy, dx) of the flattened padded masks, so every
  # neighbour is one contiguous 1-D slice. The columns x >= W of each row wrap around and are
  # dropped (their weights are 0).
  span = (height - 1) * padded_width + width
  flat_weights = jnp.pad(weights, ((0, 0), (0, 0), (0, 2 * pad), (0, 0)))
  flat_weights = flat_weights.reshape(batch, height * padded_width, num_neighbours)
  flat_weights = flat_weights[:, :span, :, None]
  starts = [(pad + dy) * padded_width + pad + dx
            for dy, dx in _neighbour_offsets(dilations, include_centre=False)]

  def propagate(_, current):
    flat = _edge_pad(current, pad, (1, 2)).reshape(
        batch, padded_height * padded_width, num_lanes)
    refined = sum(flat_weights[:, :, k] * flat[:, start:start + span]
                  for k, start in enumerate(starts))
    refined = jnp.pad(refined, ((0, 0), (0, height * padded_width - span), (0, 0)))
    return refined.reshape(batch, height, padded_width, num_lanes)[:, :, :width]

  padded_masks = jnp.pad(jax.lax.stop_gradient(masks).astype(jnp.float32),
                         ((0, 0), (0, 0), (0, 0), (0, num_lanes - num_channels)))
  return jax.lax.fori_loop(0, num_iter, propagate, padded_masks)[..., :num_channels]
