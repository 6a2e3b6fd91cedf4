"""Connected-component labelling, batched and jittable (spec 5.1 `get_CCL`, 5.2 step 2).

Labels are propagated inside `lax.while_loop` until nothing changes. Every foreground pixel
starts with its flat index + 1; each iteration takes the minimum label over the neighbourhood,
hooks the pixel that a label points to onto that minimum (a scatter-min), then follows labels
as pointers (`label <- label[label - 1]`) a few times. Pointer jumping makes long snakes and
spirals converge in a few iterations (8 for a 128 x 128 spiral) instead of O(H * W). Every update
only replaces a label by a smaller label of the same component, and the loop stops once each
label equals its neighbourhood minimum, i.e. once every component is uniform.

At convergence every component carries 1 + the smallest flat (row-major) index of its pixels,
so labels are deterministic but NOT consecutive; background is 0.
"""
import jax.numpy as jnp
from jax import lax

# Pointer-jumping gathers per propagation step.
_POINTER_JUMPS_PER_STEP = 2


def _neighbourhood_min(labels, connectivity, outside):
  """Minimum of `labels [B, H, W]` over each pixel and its 4 or 8 neighbours.

  Pixels outside the image count as `outside` (the background sentinel, above every label).
  """
  padded = jnp.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=outside)
  height, width = labels.shape[1:]

  def shift(d_row, d_col):  # labels at (i + d_row, j + d_col)
    return padded[:, 1 + d_row:1 + d_row + height, 1 + d_col:1 + d_col + width]

  if connectivity == 4:
    offsets = ((-1, 0), (1, 0), (0, -1), (0, 1))
  else:
    offsets = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
  result = labels
  for d_row, d_col in offsets:
    result = jnp.minimum(result, shift(d_row, d_col))
  return result


def label(mask, connectivity=4):
  """Connected components of `mask [B, H, W]` bool -> int32 `[B, H, W]`, 0 = background.

  Args:
    mask: foreground pixels.
    connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).

  Returns:
    Per image, each component labelled 1 + the smallest row-major flat index of its pixels
    (labels are not consecutive).
  """
  if connectivity not in (4, 8):
    raise ValueError(f"label: connectivity must be 4 or 8, got {connectivity}.")
  if mask.ndim != 3:
    raise ValueError(f"label: mask must be [B, H, W], got shape {mask.shape}.")
  mask = mask.astype(bool)
  batch, height, width = mask.shape
  num_pixels = height * width
  # Background holds the sentinel num_pixels + 1; the flat arrays carry one extra slot at index
  # num_pixels that holds the sentinel too, so `labels - 1` is always a valid gather index.
  sentinel = num_pixels + 1
  flat_index = jnp.arange(num_pixels, dtype=jnp.int32).reshape(1, height, width)
  initial = jnp.where(mask, flat_index + 1, sentinel).astype(jnp.int32)
  batch_index = jnp.arange(batch)[:, None]

  def with_sentinel_slot(labels):
    return jnp.concatenate(
        [labels.reshape(batch, num_pixels), jnp.full((batch, 1), sentinel, jnp.int32)], axis=1)

  def propagate(state):
    labels, _ = state
    smallest = jnp.where(mask, _neighbourhood_min(labels, connectivity, sentinel), sentinel)
    # Hooking: the pixel a label points to takes the smallest label seen next to any of its
    # followers, which joins the two trees in one step.
    flat = with_sentinel_slot(labels)
    flat = flat.at[batch_index, flat[:, :num_pixels] - 1].min(smallest.reshape(batch, -1))
    flat = jnp.minimum(flat, with_sentinel_slot(smallest))
    for _ in range(_POINTER_JUMPS_PER_STEP):
      flat = jnp.take_along_axis(flat, flat - 1, axis=1)
    new_labels = flat[:, :num_pixels].reshape(batch, height, width)
    return new_labels, jnp.any(new_labels != labels)

  # `True`, derived from the input so that under shard_map it varies over devices like it.
  keep_going = jnp.any(initial >= 0)
  labels, _ = lax.while_loop(lambda state: state[1], propagate, (initial, keep_going))
  return jnp.where(mask, labels, 0)
