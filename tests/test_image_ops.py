"""image_ops: resizing with PyTorch semantics, normalisation, crop boxes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax import image_ops


def _row(values):
  return jnp.asarray(values, jnp.float32).reshape(1, 1, -1, 1)


def test_bilinear_matches_hand_computed_torch_values():
  # torch: F.interpolate([0, 1], size=4, mode="bilinear", align_corners=False) -> 0, .25, .75, 1
  up = image_ops.resize_bilinear(_row([0.0, 1.0]), (1, 4))
  np.testing.assert_allclose(up.ravel(), [0.0, 0.25, 0.75, 1.0], atol=1e-6)
  # Downsampling without antialias samples src = (d + .5) * 2 - .5 = .5, 2.5.
  down = image_ops.resize_bilinear(_row([0.0, 1.0, 2.0, 3.0]), (1, 2))
  np.testing.assert_allclose(down.ravel(), [0.5, 2.5], atol=1e-6)


def test_bilinear_matches_jax_scale_and_translate_without_antialias():
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
  for size in [(13, 5), (3, 18), (7, 9)]:
    ours = image_ops.resize_bilinear(x, size)
    scale = jnp.asarray([size[0] / 7, size[1] / 9])
    ref = jax.image.scale_and_translate(
        x, (2, *size, 3), (1, 2), scale, jnp.zeros(2), method="linear", antialias=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_align_corners_and_nearest_match_torch_index_rules():
  up = image_ops.resize_bilinear_align_corners(_row([0.0, 3.0]), (1, 4))
  np.testing.assert_allclose(up.ravel(), [0.0, 1.0, 2.0, 3.0], atol=1e-6)
  # Legacy nearest: src = floor(d * in / out).
  near = image_ops.resize_nearest(_row([10.0, 20.0, 30.0]), (1, 5))
  np.testing.assert_array_equal(near.ravel(), [10, 10, 20, 20, 30])
  near = image_ops.resize_nearest(_row([1.0, 2.0, 3.0, 4.0, 5.0]), (1, 2))
  np.testing.assert_array_equal(near.ravel(), [1, 3])


def test_normalize_round_trip_and_mean_is_zero():
  mean_pixel = jnp.asarray(image_ops.IMAGENET_MEAN) * 255
  np.testing.assert_allclose(image_ops.normalize(mean_pixel), 0.0, atol=1e-5)
  image = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 4, 3)), jnp.uint8)
  np.testing.assert_allclose(image_ops.denormalize(image_ops.normalize(image)), image, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 4, 16])
def test_box_mask_and_scale_box(stride):
  box = jnp.asarray([[0, 0, 32, 32], [5, 9, 21, 30]])
  grid = (32 // stride, 32 // stride)
  mask = np.asarray(image_ops.box_mask(image_ops.scale_box(box, stride), grid))
  assert mask[0].all()
  top, left, bottom, right = 5 // stride, 9 // stride, -(-21 // stride), -(-30 // stride)
  expected = np.zeros(grid, bool)
  expected[top:bottom, left:right] = True
  np.testing.assert_array_equal(mask[1], expected)
