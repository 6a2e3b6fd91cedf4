"""Context Decoupling Augmentation of a partner into a target (Su et al., ICCV 2021), adapted.

A reconstruction: CDA pastes object instances cut by a pseudo mask onto another image at a random
position, so that an object is seen away from its usual context. Here the pseudo mask is the
partner's RecurSeed seed. On the seed grid (h, w), for target i and partner j (`MixSettings`
fields in brackets):

    c      = one random class present in seed_j (nothing is pasted when there is none)
    O      = the cells of seed_j labelled c + 1, or only their largest 4-connected component
             [cda_instances = "class" | "component"]
    offset = (dy, dx) uniform among those that keep O's bounding box inside i's valid cells
             (inside the grid where the box does not fit there); (0, 0) without translation
             [cda_translate]
    M      = O moved by the offset; x_j (by stride * offset), seed_j and j's crop box move too

The caller pastes the moved `x_j` and `seed_j` on M and adds c to i's tags. Everything is static
shaped: the move is a gather of wrapped indices, and M never reaches the wrapped part.
"""
import jax
import jax.numpy as jnp

from rsepm_jax.refine import components


def _largest_component(mask):
  """bool [B, h, w]: the largest 4-connected component of `mask` (ties: first in row-major)."""
  batch, height, width = mask.shape
  ids = components.label(mask, connectivity=4).reshape(batch, -1)  # 0 background, else 1..h*w
  sizes = jnp.zeros((batch, height * width + 1), jnp.int32).at[
      jnp.arange(batch)[:, None], ids].add(1).at[:, 0].set(0)
  largest = jnp.argmax(sizes, axis=1)
  return (mask.reshape(batch, -1) & (ids == largest[:, None])).reshape(mask.shape)


def object_mask(keys, seeds, present, instances):
  """O: one random present class of each seed, all of it or its largest component.

  Args:
    keys: [B] PRNG keys, one per image.
    seeds: int [B, h, w] (0 background, c + 1 class c, 255 ignore).
    present: bool [B, C] classes with a pixel in `seeds`.
    instances: "class" or "component".

  Returns:
    bool [B, h, w]; empty where no class is present.
  """
  draws = jax.vmap(lambda key: jax.random.uniform(key, present.shape[1:]))(keys)
  chosen = jnp.argmax(jnp.where(present, draws, -1.0), axis=1)
  mask = (seeds == chosen[:, None, None] + 1) & present.any(axis=1)[:, None, None]
  return _largest_component(mask) if instances == "component" else mask


def _span(occupied):
  """(first, end) [B] of the True entries of `occupied [B, n]`; (0, n) when there are none."""
  size = occupied.shape[1]
  return jnp.argmax(occupied, axis=1), size - jnp.argmax(occupied[:, ::-1], axis=1)


def random_offsets(keys, mask, region, translate):
  """Offsets (dy, dx) int32 [B, 2] that keep the bounding box of `mask [B, h, w]` inside
  `region [B, 4]` (top, left, bottom, right on the grid), or inside the grid along an axis where
  it does not fit; uniform among them (`keys [B, 2]`: one per image and axis). Zero for an empty
  mask or without `translate`."""
  if not translate:
    return jnp.zeros((mask.shape[0], 2), jnp.int32)
  offsets = []
  for axis, other, key_index in ((1, 2, 0), (2, 1, 1)):
    first, end = _span(mask.any(axis=other))
    low, high = region[:, axis - 1] - first, region[:, axis + 1] - end
    fits = low <= high
    low = jnp.where(fits, low, -first)
    high = jnp.where(fits, high, mask.shape[axis] - end)
    offsets.append(jax.vmap(lambda key, lo, hi: jax.random.randint(key, (), lo, hi + 1))(
        keys[:, key_index], low, high))
  return jnp.where(mask.any(axis=(1, 2))[:, None], jnp.stack(offsets, axis=1), 0).astype(jnp.int32)


def move(x, offsets):
  """`x [B, H, W, ...]` moved by `offsets int [B, 2]` (rows, columns), wrapping around."""
  height, width = x.shape[1:3]
  rows = (jnp.arange(height) - offsets[:, :1]) % height
  cols = (jnp.arange(width) - offsets[:, 1:]) % width
  return jax.vmap(lambda image, r, c: image[r][:, c])(x, rows, cols)


def paste_object(keys, partner, present, target_region, settings):
  """The partner's object O moved to its random place in the target, and the partner with it.

  Args:
    keys: [B] PRNG keys, one per target image.
    partner: dict with `images [B, H, W, 3]`, `seeds int32 [B, h, w]`, `crop_box int [B, 4]`
      (image pixels); H = stride * h, W = stride * w.
    present: bool [B, C] the classes present in `partner["seeds"]`.
    target_region: int [B, 4] the target's valid cells (top, left, bottom, right) on the grid.
    settings: `MixSettings` (cda_instances, cda_translate).

  Returns:
    (M bool [B, h, w], dict of the moved `images`, `seeds` and `crop_box` (clipped to the image)).
  """
  split = jax.vmap(lambda key: jax.random.split(key, 3))(keys)  # class, row, column draws
  mask = object_mask(split[:, 0], partner["seeds"], present, settings.cda_instances)
  offsets = random_offsets(split[:, 1:], mask, target_region, settings.cda_translate)
  height, width = partner["images"].shape[1:3]
  pixel_offsets = offsets * jnp.asarray([height // mask.shape[1], width // mask.shape[2]])
  limit = jnp.asarray([height, width, height, width])
  moved_box = jnp.clip(partner["crop_box"] + jnp.tile(pixel_offsets, (1, 2)), 0, limit)
  return move(mask, offsets), {"images": move(partner["images"], pixel_offsets),
                               "seeds": move(partner["seeds"], offsets), "crop_box": moved_box}
