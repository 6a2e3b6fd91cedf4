"""SCG: self-correlation map generation, RS+EPM variant (rsepm_spec 2.1, components_spec C).

Positions are flattened row-major, i = y * w + x, so an N x N matrix H[i, j] relates position i
(row) to position j (column). "Column normalisation" divides each column j by its sum over the
rows i (dim=1 of the official (B, N, N) tensors), so every column sums to 1.
"""
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _column_normalize(matrix):
  """[B, N, N] -> each column divided by its sum over rows + 1e-10."""
  # Column sums as a matrix-vector product: XLA:CPU fuses a reduction feeding a matmul operand
  # into the matmul, which then runs about 3x slower.
  ones = jnp.ones(matrix.shape[1], matrix.dtype)
  column_sums = jnp.einsum("bij,i->bj", matrix, ones, precision=_HIGHEST)
  return matrix / (column_sums[:, None, :] + 1e-10)


def _min_max(values, axis):
  """(v - min) / (max - min + 1e-10) along `axis`."""
  low = jnp.min(values, axis=axis, keepdims=True)
  high = jnp.max(values, axis=axis, keepdims=True)
  return (values - low) / (high - low + 1e-10)


def _level_self_correlation(features, first_th, second_th, iterations, second_weight):
  """HSC of one feature level (spec 2.1 steps 1-4): [B, h, w, D] -> [B, N, N]."""
  batch, height, width, depth = features.shape
  num_positions = height * width
  vectors = features.astype(jnp.float32).reshape(batch, num_positions, depth)
  # Cosine similarity of f / (|f| + 1e-10), scaled after the matmul for the same reason as in
  # `_column_normalize`.
  inverse_norms = 1.0 / (jnp.linalg.norm(vectors, axis=-1) + 1e-10)
  first = jnp.einsum("bid,bjd->bij", vectors, vectors, precision=_HIGHEST)
  first = jax.nn.relu(first * inverse_norms[:, :, None] * inverse_norms[:, None, :])
  first = jnp.where(first < first_th, 0.0, first)

  # Second order: a random walk on the first-order graph without self-loops.
  transition = _column_normalize(
      jnp.where(jnp.eye(num_positions, dtype=bool), 0.0, first))
  second = transition
  for _ in range(iterations):
    second = _column_normalize(
        jnp.einsum("bik,bkj->bij", second, transition, precision=_HIGHEST))
  second = jnp.where(second < second_th / num_positions, 0.0, second)
  return _column_normalize(jnp.maximum(_column_normalize(first), second_weight * second))


def _check_levels(features, caller, grid=None):
  """Raises unless `features` is a non-empty list of [B, h, w, D_l] maps on one grid."""
  if not features:
    raise ValueError(f"{caller}: features must be a non-empty list of [B, h, w, D] arrays.")
  grid = features[0].shape[:3] if grid is None else grid
  for level, level_features in enumerate(features):
    if level_features.ndim != 4 or level_features.shape[:3] != grid:
      raise ValueError(
          f"{caller}: features[{level}] must be [B, h, w, D] with (B, h, w) = {grid}, "
          f"got shape {level_features.shape}.")


def high_order_self_correlation(features, first_th=0.5, second_th=0.1, iterations=1,
                                second_weight=1.0):
  """Summed high-order self-correlation of several levels (rsepm_spec 2.1, HSC).

  Args:
    features: list of [B, h, w, D_l] feature maps on one grid (D_l may differ).
    first_th: cosine similarities below it are zeroed (tau_1).
    second_th: second-order entries below second_th / N are zeroed (tau_2, relative).
    iterations: static number of extra random-walk products (1 = second order).
    second_weight: lambda in max(first order, lambda * second order).

  Returns:
    [B, N, N] float32, N = h * w, the sum over levels of column-normalised HSC matrices.
  """
  _check_levels(features, "high_order_self_correlation")
  return sum(
      _level_self_correlation(jax.lax.stop_gradient(level_features), first_th, second_th,
                              iterations, second_weight)
      for level_features in features)


def scg(scores, features, first_th=0.5, second_th=0.1, fg_th=0.3, bg_th=0.05, iterations=1,
        second_weight=1.0):
  """Self-correlation maps of every class (rsepm_spec 2.1, SCM), all classes at once.

  Args:
    scores: [B, h, w, C] normalised score maps in [0, 1] (e.g. relu(cam) / max).
    features: list of [B, h, w, D_l] feature maps on the same grid.
    first_th, second_th, iterations, second_weight: HSC settings, see
      `high_order_self_correlation`.
    fg_th: positions with score >= fg_th are foreground seed columns.
    bg_th: positions with score <= bg_th are background seed columns.

  Returns:
    [B, h, w, C] float32 maps in [0, 1]; all zeros for a class without foreground seeds.
  """
  if scores.ndim != 4:
    raise ValueError(f"scg: scores must be [B, h, w, C], got shape {scores.shape}.")
  _check_levels(features, "scg", grid=scores.shape[:3])
  batch, height, width, num_classes = scores.shape
  scores = jax.lax.stop_gradient(scores).reshape(batch, height * width, num_classes)
  correlation = _min_max(
      high_order_self_correlation(features, first_th, second_th, iterations, second_weight),
      axis=1)

  def seeded_map(seeds):
    """minmax over positions of the summed seed columns; zeros for an empty seed set."""
    summed = jnp.einsum("bij,bjc->bic", correlation, seeds.astype(jnp.float32),
                        precision=_HIGHEST)
    return jnp.where(jnp.any(seeds, axis=1, keepdims=True), _min_max(summed, axis=1), 0.0)

  foreground = seeded_map(scores >= fg_th)
  background = seeded_map(scores <= bg_th)
  maps = _min_max(jax.nn.relu(foreground - background), axis=1)
  return maps.reshape(batch, height, width, num_classes)
