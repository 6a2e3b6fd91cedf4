"""SCG (rsepm_spec 2.1) against a per-image, per-class numpy reference, plus its invariants."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax.refine.scg import high_order_self_correlation, scg

HEIGHT, WIDTH = 5, 6
NUM_POSITIONS = HEIGHT * WIDTH


def column_normalize(matrix):
  return matrix / (matrix.sum(axis=0, keepdims=True) + 1e-10)


def min_max(values):
  return (values - values.min()) / (values.max() - values.min() + 1e-10)


def reference_level_hsc(features, first_th, second_th, iterations, second_weight):
  """Spec 2.1 steps 1-4 for one image and one level, float64: [h, w, D] -> [N, N]."""
  vectors = features.reshape(-1, features.shape[-1]).astype(np.float64)
  vectors = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-10)
  similarity = np.maximum(vectors @ vectors.T, 0.0)
  similarity[similarity < first_th] = 0.0
  first = column_normalize(similarity)
  transition = similarity.copy()
  np.fill_diagonal(transition, 0.0)
  transition = column_normalize(transition)
  second = transition
  for _ in range(iterations):
    second = column_normalize(second @ transition)
  second[second < second_th / len(vectors)] = 0.0
  return column_normalize(np.maximum(first, second_weight * second))


def reference_scg(scores, features, first_th=0.5, second_th=0.1, fg_th=0.3, bg_th=0.05):
  """Spec 2.1 SCM, image by image and class by class: [B, h, w, C] -> [B, h, w, C]."""
  output = np.zeros(scores.shape)
  for b in range(scores.shape[0]):
    correlation = sum(reference_level_hsc(level[b], first_th, second_th, 1, 1.0)
                      for level in features)
    normalized = np.zeros_like(correlation)
    for j in range(correlation.shape[1]):
      normalized[:, j] = min_max(correlation[:, j])
    for c in range(scores.shape[-1]):
      class_scores = scores[b, :, :, c].reshape(-1)
      foreground = np.flatnonzero(class_scores >= fg_th)
      background = np.flatnonzero(class_scores <= bg_th)
      fg_map = (min_max(normalized[:, foreground].sum(axis=1)) if foreground.size
                else np.zeros(len(class_scores)))
      bg_map = (min_max(normalized[:, background].sum(axis=1)) if background.size
                else np.zeros(len(class_scores)))
      output[b, :, :, c] = min_max(np.maximum(fg_map - bg_map, 0.0)).reshape(scores.shape[1:3])
  return output


@functools.lru_cache(maxsize=None)
def random_features():
  """Two levels of post-ReLU-like features (D = 8 and 12); one position is all zeros."""
  rng = np.random.default_rng(0)
  levels = []
  for depth in (8, 12):
    level = np.maximum(rng.normal(0.3, 1.0, size=(2, HEIGHT, WIDTH, depth)), 0.0)
    level[0, 2, 3] = 0.0
    levels.append(level.astype(np.float32))
  return tuple(levels)


def random_scores():
  """[2, h, w, 5]: a mixed class, fg everywhere (no bg), neither, bg only, a single fg seed."""
  rng = np.random.default_rng(1)
  scores = np.stack([
      rng.uniform(0.0, 1.0, size=(2, HEIGHT, WIDTH)),
      rng.uniform(0.35, 1.0, size=(2, HEIGHT, WIDTH)),
      rng.uniform(0.1, 0.25, size=(2, HEIGHT, WIDTH)),
      rng.uniform(0.0, 0.04, size=(2, HEIGHT, WIDTH)),
      rng.uniform(0.0, 0.04, size=(2, HEIGHT, WIDTH)),
  ], axis=-1)
  scores[:, 1, 1, 4] = 0.9
  return scores.astype(np.float32)


jitted_scg = jax.jit(scg)
jitted_hsc = jax.jit(high_order_self_correlation, static_argnames=("iterations",))


@pytest.mark.parametrize("iterations, second_weight", [(1, 1.0), (2, 0.5)])
def test_high_order_self_correlation_matches_reference(iterations, second_weight):
  features = random_features()
  correlation = jitted_hsc(list(features), iterations=iterations, second_weight=second_weight)
  assert correlation.shape == (2, NUM_POSITIONS, NUM_POSITIONS)
  expected = np.stack([
      sum(reference_level_hsc(level[b], 0.5, 0.1, iterations, second_weight)
          for level in features) for b in range(2)])
  np.testing.assert_allclose(correlation, expected, rtol=1e-5, atol=1e-6)


def test_high_order_self_correlation_columns_sum_to_one_per_level():
  features = random_features()
  one_level = np.asarray(jitted_hsc([features[0]]))
  column_sums = one_level.sum(axis=1)
  # The all-zero feature vector at (2, 3) of image 0 correlates with nothing.
  assert np.all(one_level[0, :, 2 * WIDTH + 3] == 0.0)
  nonzero = np.any(one_level != 0.0, axis=1)
  assert nonzero.sum() == 2 * NUM_POSITIONS - 1
  np.testing.assert_allclose(column_sums[nonzero], 1.0, atol=1e-5)
  two_levels = np.asarray(jitted_hsc(list(features))).sum(axis=1)
  np.testing.assert_allclose(two_levels[1], 2.0, atol=1e-5)


def test_scg_matches_reference_with_empty_seed_sets():
  scores = random_scores()
  features = random_features()
  maps = np.asarray(jitted_scg(scores, list(features)))
  expected = reference_scg(scores, features)
  assert maps.shape == scores.shape and maps.dtype == np.float32
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)
  # Classes without foreground seeds give zeros; the others span [0, 1].
  assert np.all(maps[..., 2:4] == 0.0)
  assert np.all(maps >= 0.0) and np.all(maps <= 1.0 + 1e-6)
  for c in (0, 1, 4):
    assert np.allclose(maps[..., c].reshape(2, -1).max(axis=1), 1.0, atol=1e-5)


def test_no_gradient_flows():
  scores = random_scores()
  features = random_features()
  gradient = jax.jit(jax.grad(lambda f: jnp.sum(scg(scores, [f, features[1]]))))(features[0])
  assert np.all(np.asarray(gradient) == 0.0)


def test_rejects_features_off_the_score_grid():
  with pytest.raises(ValueError, match=r"features\[1\]"):
    scg(random_scores(), [random_features()[0], random_features()[1][:, :-1]])
