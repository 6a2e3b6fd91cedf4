"""Tests for rsepm_jax.losses against direct numpy formulas and loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax import losses

BATCH, HEIGHT, WIDTH, NUM_FG = 3, 8, 8, 4

jit_soft_margin = jax.jit(losses.multilabel_soft_margin)
jit_gap = jax.jit(losses.masked_gap)
jit_seg_ce = jax.jit(losses.segmentation_cross_entropy)
jit_cam_loss = jax.jit(losses.cam_loss, static_argnames=("kind", "ignore_index"))


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_log_softmax(logits):
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def naive_pixel_ce(logits, target, ignore_index=255):
  """Loop over pixels: -log softmax at the target, mean over non-ignored pixels."""
  log_probs = np_log_softmax(logits.astype(np.float64))
  total, count = 0.0, 0
  for index in np.ndindex(target.shape):
    if target[index] != ignore_index:
      total -= log_probs[index][target[index]]
      count += 1
  return total / count if count else 0.0


def random_seed_map(rng, ignore_fraction=0.3):
  seed = rng.integers(0, NUM_FG + 1, (BATCH, HEIGHT, WIDTH)).astype(np.int32)
  seed[rng.random(seed.shape) < ignore_fraction] = 255
  return seed


def test_multilabel_soft_margin_matches_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (BATCH, NUM_FG)).astype(np.float32)
  labels = (rng.random((BATCH, NUM_FG)) < 0.5).astype(np.float32)
  sigmoid = 1 / (1 + np.exp(-logits.astype(np.float64)))
  per_class = -(labels * np.log(sigmoid) + (1 - labels) * np.log(1 - sigmoid))
  expected = per_class.mean(axis=1).mean()  # mean over classes, then over the batch.
  assert float(jit_soft_margin(logits, labels)) == pytest.approx(expected, rel=1e-5)


def test_multilabel_soft_margin_extreme_logits():
  logits = np.array([[100.0, -100.0], [100.0, -100.0]], np.float32)
  labels = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
  # Row 0 is wrong on both classes with margin 100 -> 100; row 1 is right -> ~0. Mean 50.
  loss, grads = jax.jit(jax.value_and_grad(losses.multilabel_soft_margin))(logits, labels)
  assert float(loss) == pytest.approx(50.0, rel=1e-6)
  assert np.all(np.isfinite(np.asarray(grads)))
  # d/dx of mean BCE = (sigmoid(x) - y) / (B * C): +-1/4 on row 0, ~0 on row 1.
  np.testing.assert_allclose(np.asarray(grads), [[0.25, -0.25], [0.0, 0.0]], atol=1e-6)


def test_masked_gap_matches_naive_box_mean():
  rng = np.random.default_rng(1)
  cams = rng.normal(size=(BATCH, HEIGHT, WIDTH, NUM_FG)).astype(np.float32)
  boxes = np.array([[0, 0, HEIGHT, WIDTH], [1, 2, 5, 7], [3, 0, 4, 1]], np.int32)
  got = np.asarray(jit_gap(cams, boxes))
  for image, (top, left, bottom, right) in enumerate(boxes):
    expected = cams[image, top:bottom, left:right].reshape(-1, NUM_FG).mean(axis=0)
    np.testing.assert_allclose(got[image], expected, rtol=1e-5, atol=1e-6)


def test_masked_gap_empty_box_is_zero():
  cams = np.ones((BATCH, HEIGHT, WIDTH, NUM_FG), np.float32)
  boxes = np.array([[0, 0, 0, 0], [2, 2, 2, 5], [0, 0, 1, 1]], np.int32)
  np.testing.assert_array_equal(np.asarray(jit_gap(cams, boxes)), [[0] * 4, [0] * 4, [1] * 4])


def test_segmentation_cross_entropy_matches_naive():
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 2, (BATCH, HEIGHT, WIDTH, NUM_FG + 1)).astype(np.float32)
  target = random_seed_map(rng)
  got = float(jit_seg_ce(logits, target))
  assert got == pytest.approx(naive_pixel_ce(logits, target), rel=1e-5)


def test_segmentation_cross_entropy_all_ignored_is_zero_with_zero_grad():
  logits = np.zeros((BATCH, HEIGHT, WIDTH, NUM_FG + 1), np.float32)
  target = np.full((BATCH, HEIGHT, WIDTH), 255, np.int32)
  loss, grads = jax.jit(jax.value_and_grad(losses.segmentation_cross_entropy))(logits, target)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(np.asarray(grads), 0.0)


def test_segmentation_cross_entropy_rejects_shape_mismatch():
  with pytest.raises(ValueError, match="segmentation_cross_entropy: target shape"):
    losses.segmentation_cross_entropy(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 2, 2), jnp.int32))


def test_cam_loss_bce_matches_naive():
  rng = np.random.default_rng(3)
  cams = rng.normal(0, 3, (BATCH, HEIGHT, WIDTH, NUM_FG)).astype(np.float32)
  seed = random_seed_map(rng)
  total, count = 0.0, 0
  for index in np.ndindex(seed.shape):
    if seed[index] == 255:
      continue
    for channel in range(NUM_FG):
      x = float(cams[index][channel])
      target = 1.0 if seed[index] == channel + 1 else 0.0  # background and other classes: 0.
      total -= target * np_log_sigmoid(x) + (1 - target) * np_log_sigmoid(-x)
      count += 1
  got = float(jit_cam_loss(cams, seed, kind="bce"))
  assert got == pytest.approx(total / count, rel=1e-5)


def test_cam_loss_ce_matches_naive_with_constant_background():
  rng = np.random.default_rng(4)
  cams = rng.normal(0, 3, (BATCH, HEIGHT, WIDTH, NUM_FG)).astype(np.float32)
  seed = random_seed_map(rng)
  bg_logit = 0.5
  with_background = np.concatenate([np.full(seed.shape + (1,), bg_logit), cams], axis=-1)
  got = float(jit_cam_loss(cams, seed, kind="ce", bg_logit=bg_logit))
  assert got == pytest.approx(naive_pixel_ce(with_background, seed), rel=1e-5)


@pytest.mark.parametrize("kind", ["bce", "ce"])
def test_cam_loss_all_ignored_and_gradients_finite(kind):
  cams = np.zeros((BATCH, HEIGHT, WIDTH, NUM_FG), np.float32)
  seed = np.full((BATCH, HEIGHT, WIDTH), 255, np.int32)
  assert float(jit_cam_loss(cams, seed, kind=kind)) == 0.0
  rng = np.random.default_rng(5)
  cams = rng.normal(0, 50, cams.shape).astype(np.float32)  # saturated sigmoids / softmaxes.
  grads = jax.jit(jax.grad(losses.cam_loss), static_argnums=2)(cams, random_seed_map(rng), kind)
  assert np.all(np.isfinite(np.asarray(grads)))
  assert np.any(np.asarray(grads) != 0)


def test_cam_loss_unknown_kind():
  with pytest.raises(ValueError, match="kind must be 'bce' or 'ce', got 'mse'"):
    losses.cam_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2), jnp.int32), kind="mse")


def test_losses_gradients_finite():
  rng = np.random.default_rng(6)
  cams = rng.normal(0, 30, (BATCH, HEIGHT, WIDTH, NUM_FG)).astype(np.float32)
  labels = (rng.random((BATCH, NUM_FG)) < 0.5).astype(np.float32)
  boxes = np.array([[0, 0, HEIGHT, WIDTH], [1, 2, 5, 7], [0, 0, 0, 0]], np.int32)

  def classification_loss(cams):
    return losses.multilabel_soft_margin(losses.masked_gap(cams, boxes), labels)

  grads = np.asarray(jax.jit(jax.grad(classification_loss))(cams))
  assert np.all(np.isfinite(grads))
  assert np.all(grads[2] == 0)  # empty box: no gradient reaches the image.
  assert np.all(grads[1, :1] == 0) and np.any(grads[1, 1:5, 2:7] != 0)  # only inside the box.
  seg_grads = jax.jit(jax.grad(losses.segmentation_cross_entropy))(
      rng.normal(0, 30, (BATCH, HEIGHT, WIDTH, NUM_FG + 1)).astype(np.float32),
      random_seed_map(rng))
  assert np.all(np.isfinite(np.asarray(seg_grads)))
