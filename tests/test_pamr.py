"""PAMR (rsepm_spec 3.1) against a per-pixel numpy loop reference, plus its invariants."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax.refine.pamr import pamr

STANDARD_DILATIONS = (1, 2, 4, 8, 12, 24)
WINDOW = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
NEIGHBOURS = [offset for offset in WINDOW if offset != (0, 0)]

# num_iter may be traced (it only bounds a fori_loop): one compile per dilation set.
jitted_pamr = jax.jit(pamr, static_argnames=("dilations",))


def reference_pamr(image, masks, num_iter, dilations, sigma=0.1):
  """Spec 3.1 written pixel by pixel in float64, with one edge padding per dilation."""
  image = image.astype(np.float64)
  masks = masks.astype(np.float64)
  batch, height, width, _ = image.shape
  padded_images = {d: np.pad(image, ((0, 0), (d, d), (d, d), (0, 0)), mode="edge")
                   for d in dilations}
  weights = np.zeros((batch, height, width, 8 * len(dilations)))
  for y in range(height):
    for x in range(width):
      window = [padded_images[d][:, d + y + d * dy, d + x + d * dx]
                for d in dilations for dy, dx in WINDOW]
      std = np.std(np.stack(window), axis=0, ddof=1)  # [B, 3]
      affinity = np.stack(
          [np.mean(-np.abs(image[:, y, x] - padded_images[d][:, d + y + d * dy, d + x + d * dx])
                   / (sigma * std + 1e-8), axis=-1)
           for d in dilations for dy, dx in NEIGHBOURS], axis=-1)
      exp = np.exp(affinity - affinity.max(axis=-1, keepdims=True))
      weights[:, y, x] = exp / exp.sum(axis=-1, keepdims=True)
  for _ in range(num_iter):
    padded_masks = {d: np.pad(masks, ((0, 0), (d, d), (d, d), (0, 0)), mode="edge")
                    for d in dilations}
    refined = np.zeros_like(masks)
    for y in range(height):
      for x in range(width):
        k = 0
        for d in dilations:
          for dy, dx in NEIGHBOURS:
            refined[:, y, x] += (weights[:, y, x, k, None]
                                 * padded_masks[d][:, d + y + d * dy, d + x + d * dx])
            k += 1
    masks = refined
  return masks


@functools.lru_cache(maxsize=None)
def random_inputs(seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(2, 12, 14, 3)).astype(np.float32)
  logits = rng.normal(size=(2, 12, 14, 3)).astype(np.float32) * 2
  masks = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
  return image, masks.astype(np.float32)


@pytest.mark.parametrize("dilations", [(1,), (1, 2), STANDARD_DILATIONS])
@pytest.mark.parametrize("num_iter", [1, 3])
def test_matches_pixel_loop_reference(dilations, num_iter):
  image, masks = random_inputs()
  refined = jitted_pamr(image, masks, num_iter=num_iter, dilations=dilations)
  assert refined.shape == masks.shape and refined.dtype == jnp.float32
  np.testing.assert_allclose(
      refined, reference_pamr(image, masks, num_iter, dilations), rtol=0, atol=1e-5)


def test_output_is_a_convex_combination():
  image, masks = random_inputs()
  masks = masks.copy()
  masks[..., 2] = 0.0  # an absent class
  masks /= masks.sum(axis=-1, keepdims=True)
  refined = np.asarray(jitted_pamr(image, masks, num_iter=3, dilations=STANDARD_DILATIONS))
  np.testing.assert_allclose(refined.sum(axis=-1), 1.0, atol=1e-5)
  assert np.all(refined[..., 2] == 0.0)
  for channel in range(2):
    assert refined[..., channel].min() >= masks[..., channel].min() - 1e-6
    assert refined[..., channel].max() <= masks[..., channel].max() + 1e-6
  # Not the identity: the refinement has actually moved values.
  assert np.abs(refined - masks).max() > 1e-2


def test_invariant_to_affine_image_scaling():
  image, masks = random_inputs()
  refined = jitted_pamr(image, masks, num_iter=3, dilations=STANDARD_DILATIONS)
  rescaled = jitted_pamr(image * 7 + 3, masks, num_iter=3, dilations=STANDARD_DILATIONS)
  np.testing.assert_allclose(rescaled, refined, rtol=0, atol=1e-4)


def test_constant_image_averages_the_neighbours():
  _, masks = random_inputs()
  image = np.full((2, 12, 14, 3), 0.25, np.float32)
  refined = jitted_pamr(image, masks, num_iter=1, dilations=(1, 2))
  neighbour_sum = 0
  for d in (1, 2):
    padded = np.pad(masks, ((0, 0), (d, d), (d, d), (0, 0)), mode="edge")
    for dy, dx in NEIGHBOURS:
      neighbour_sum += padded[:, d + d * dy:d + d * dy + 12, d + d * dx:d + d * dx + 14]
  np.testing.assert_allclose(refined, neighbour_sum / 16, rtol=0, atol=1e-6)


def test_no_gradient_flows():
  image, masks = random_inputs()
  gradient = jax.jit(jax.grad(
      lambda m: jnp.sum(pamr(image, m, num_iter=1, dilations=(1,)) ** 2)))(masks)
  assert np.all(np.asarray(gradient) == 0.0)


def test_rejects_masks_off_the_image_grid():
  image, masks = random_inputs()
  with pytest.raises(ValueError, match="masks must be"):
    pamr(image, masks[:, :-1], num_iter=1, dilations=(1,))
