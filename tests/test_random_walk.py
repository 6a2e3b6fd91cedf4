"""IRNet random walk (components_spec D.2): geometry by hand, propagate vs IRNet's dense route."""
import functools

import jax
import numpy as np
import pytest

from rsepm_jax.refine import random_walk


def test_direction_counts_and_members():
  five = {tuple(d) for d in random_walk.directions(5)}
  ten = {tuple(d) for d in random_walk.directions(10)}
  assert len(random_walk.directions(5)) == len(five) == 34
  assert len(random_walk.directions(10)) == len(ten) == 152
  assert {(0, 1), (0, 4), (1, -4), (4, 2), (3, 3), (4, -2)} <= five
  assert not {(0, 5), (0, -1), (0, 0), (3, 4), (4, 3), (5, 0), (-1, 1)} & five
  assert {(9, 4), (6, -7), (7, -7), (0, 9), (1, -9)} <= ten
  assert not {(9, 5), (8, -6), (10, 0), (0, 10)} & ten
  assert [tuple(d) for d in random_walk.directions(2)] == [(0, 1), (1, -1), (1, 0), (1, 1)]


@pytest.mark.parametrize("offset, cells", [
    ((0, 3), [(0, 0), (0, 1), (0, 2), (0, 3)]),
    ((2, 0), [(0, 0), (1, 0), (2, 0)]),
    # (2x - y)^2 / 5 < 1 holds for the whole 3x2 box.
    ((2, 1), [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]),
    # (x - y)^2 < 2: the diagonal and its two neighbouring diagonals.
    ((3, 3), [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3)]),
    # (2x - 4y)^2 / 20 < 1, i.e. |x - 2y| <= 2.
    ((2, 4), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3),
              (2, 4)]),
    # (x + 3y)^2 / 10 < 1 holds for the whole 2x4 box.
    ((1, -3), [(0, -3), (0, -2), (0, -1), (0, 0), (1, -3), (1, -2), (1, -1), (1, 0)]),
])
def test_path_cells_by_hand(offset, cells):
  assert sorted(map(tuple, random_walk.path_cells(*offset))) == sorted(cells)


EDGE_4X5 = np.array([[0.1, 0.2, 0.9, 0.1, 0.0],
                     [0.0, 0.3, 0.8, 0.2, 0.1],
                     [0.1, 0.1, 0.7, 0.4, 0.0],
                     [0.5, 0.0, 0.6, 0.1, 0.2]], np.float32)


@pytest.mark.parametrize("radius, source, offset, expected", [
    (2, (0, 0), (0, 1), 1 - 0.2),  # cells (0,0) (0,1)
    (2, (0, 1), (1, 1), 1 - 0.9),  # the 2x2 box (0..1, 1..2)
    (2, (1, 3), (1, -1), 1 - 0.8),  # the 2x2 box (1..2, 2..3)
    (2, (0, 4), (1, -1), 1 - 0.2),  # the 2x2 box (0..1, 3..4)
    (2, (2, 0), (1, 0), 1 - 0.5),  # cells (2,0) (3,0)
    (2, (2, 4), (0, 1), 0.0),  # neighbour (2, 5) is outside
    (2, (3, 0), (1, 0), 0.0),  # neighbour (4, 0) is outside
    (2, (1, 0), (1, -1), 0.0),  # neighbour (2, -1) is outside
    (3, (0, 0), (1, 2), 1 - 0.9),  # the 2x3 box (0..1, 0..2)
    (3, (3, 1), (0, 2), 1 - 0.6),  # cells (3,1) (3,2) (3,3)
    (3, (1, 4), (2, -2), 1 - 0.7),  # (1,4) (1,3) (2,4) (2,3) (2,2) (3,3) (3,2): |x - y| <= 1
])
def test_edge_to_affinity_by_hand(radius, source, offset, expected):
  affinity = np.asarray(random_walk.edge_to_affinity(EDGE_4X5[None], radius))
  index = [tuple(d) for d in random_walk.directions(radius)].index(offset)
  assert affinity.shape == (1, len(random_walk.directions(radius)), 4, 5)
  np.testing.assert_allclose(affinity[0, index][source], expected, atol=1e-6)


def test_crop_pairs_keeps_sources_with_every_neighbour_inside():
  affinity = np.asarray(random_walk.edge_to_affinity(np.zeros((1, 6, 7), np.float32), 3))
  cropped = random_walk.crop_pairs(affinity, 3)
  assert cropped.shape == (1, len(random_walk.directions(3)), 4, 3)
  assert np.all(cropped == 1.0)  # edge 0 and no neighbour outside
  assert affinity.sum() > cropped.sum()  # the pixels dropped have some neighbour outside


def test_edge_to_affinity_gradient_goes_to_the_path_maximum():
  edge = np.random.default_rng(1).random((1, 5, 6)).astype(np.float32)
  radius = 3
  jacobian = np.asarray(jax.jacrev(random_walk.edge_to_affinity)(edge, radius))[0, :, :, :, 0]
  expected = np.zeros_like(jacobian)  # [D, h, w, h, w]
  for k, (dy, dx) in enumerate(random_walk.directions(radius)):
    for y in range(5):
      for x in range(6):
        if 0 <= y + dy < 5 and 0 <= x + dx < 6:
          cells = [(y + py, x + px) for py, px in random_walk.path_cells(int(dy), int(dx))]
          expected[(k, y, x) + max(cells, key=lambda c: edge[0][c])] = -1.0
  np.testing.assert_array_equal(jacobian, expected)


def irnet_dense_propagate(scores, edge, radius, beta, exp_times):
  """IRNet's `propagate_to_edge` for one image in float64: [h, w, K], [h, w] -> [h, w, K].

  Dense A on the grid padded by r (edge 1.0) left, right and bottom, from the sources of
  `PathIndex` (rows < H' - (r - 1), columns r - 1 .. W' - r), symmetric with diagonal 1, cropped
  back to the image, A^beta column-normalised, squared exp_times times, x T.
  """
  height, width, channels = scores.shape
  padded_h, padded_w = height + radius, width + 2 * radius
  padded = np.pad(edge.astype(np.float64), ((0, radius), (radius, radius)), constant_values=1.0)
  offsets = [(0, dx) for dx in range(1, radius)] + [
      (dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
      if dx * dx + dy * dy < radius ** 2]
  dense = np.eye(padded_h * padded_w)
  floor = radius - 1
  for y in range(padded_h - floor):
    for x in range(floor, padded_w - floor):
      for dy, dx in offsets:
        path = [padded[y + py, x + px]
                for py in range(min(0, dy), max(0, dy) + 1)
                for px in range(min(0, dx), max(0, dx) + 1)
                if (dy * px - dx * py) ** 2 / (dy * dy + dx * dx) < 1]
        source, target = y * padded_w + x, (y + dy) * padded_w + x + dx
        dense[source, target] = dense[target, source] = 1 - max(path)
  dense = dense.reshape(padded_h, padded_w, padded_h, padded_w)
  dense = dense[:-radius, radius:-radius, :-radius, radius:-radius]
  dense = dense.reshape(height * width, height * width)
  transition = dense ** beta
  transition /= transition.sum(axis=0, keepdims=True)
  for _ in range(exp_times):
    transition = transition @ transition
  source = (scores.astype(np.float64) * (1 - edge.astype(np.float64))[..., None])
  rw = source.reshape(height * width, channels).T @ transition
  return rw.T.reshape(height, width, channels)


def random_edges(rng, batch, height, width):
  """Low noise with a bright ridge: affinities ~0.7-1, cut along the ridge."""
  edge = 0.25 * rng.random((batch, height, width))
  edge[:, :, width // 2] = 0.9
  edge[:, height // 2, : width // 3] = 0.95
  return edge.astype(np.float32)


@pytest.mark.parametrize("radius", [5, 2])
def test_propagate_matches_irnet_dense_route(radius):
  rng = np.random.default_rng(radius)
  edge = random_edges(rng, 2, 9, 11)
  scores = rng.random((2, 9, 11, 3)).astype(np.float32)
  run = jax.jit(functools.partial(random_walk.propagate, radius=radius, beta=10, exp_times=3))
  result = np.asarray(run(scores, edge))
  expected = np.stack([irnet_dense_propagate(scores[b], edge[b], radius, 10, 3) for b in range(2)])
  assert result.shape == scores.shape
  np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-7)
  # The walk moves mass: far from x itself.
  assert np.abs(expected - scores * (1 - edge[..., None])).max() > 0.05


def test_propagate_padded_batch_equals_unpadded_image():
  rng = np.random.default_rng(0)
  edge = random_edges(rng, 1, 6, 7)
  scores = rng.random((1, 6, 7, 2)).astype(np.float32)
  padded_edge = np.ones((1, 9, 11), np.float32)
  padded_edge[:, :6, :7] = edge
  padded_scores = rng.random((1, 9, 11, 2)).astype(np.float32)
  padded_scores[:, :6, :7] = scores
  run = functools.partial(random_walk.propagate, radius=3, beta=10, exp_times=4)
  alone = np.asarray(run(scores, edge))
  padded = np.asarray(run(padded_scores, padded_edge))
  np.testing.assert_allclose(padded[:, :6, :7], alone, rtol=1e-5, atol=1e-7)
  assert np.all(padded[:, 6:] == 0) and np.all(padded[:, :, 7:] == 0)


def test_random_walk_labels_constant_and_split_scenes():
  height, width = 5, 6  # stride-4 grid; the image is 18 x 23
  # Constant scores with no edges stay constant (T is column-stochastic).
  constant = np.broadcast_to(np.float32([0.2, 0.5, 0.1]), (2, height, width, 3)).copy()
  constant[1] *= 10  # the global max is per image
  edge = np.zeros((2, height, width), np.float32)
  scores = np.asarray(random_walk.random_walk_scores(constant, edge, (18, 23), exp_times=2))
  assert scores.shape == (2, 18, 23, 3)
  np.testing.assert_allclose(scores, np.broadcast_to([0.4, 1.0, 0.2], scores.shape), rtol=1e-5)
  labels = random_walk.random_walk_labels(constant, edge, (18, 23), exp_times=2)
  assert labels.dtype == np.uint8 and np.all(np.asarray(labels) == 2)
  assert np.all(np.asarray(random_walk.random_walk_labels(
      constant, edge, (18, 23), bg_threshold=1.5, exp_times=2)) == 0)
  # A closed boundary column separates class 0 (left) from class 2 (right).
  split = np.zeros((1, height, width, 3), np.float32)
  split[0, :, :2, 0] = 1.0
  split[0, :, 3:, 2] = 0.8
  wall = np.zeros((1, height, width), np.float32)
  wall[0, :, 2] = 1.0
  labels = np.asarray(random_walk.random_walk_labels(split, wall, (20, 24), exp_times=3))
  assert np.all(labels[0, :, :6] == 1) and np.all(labels[0, :, 14:] == 3)
  assert np.all(labels[0, :, 10] == 0)  # the wall's own cell has no score


def test_all_edges_give_background_not_nan():
  scores = np.ones((1, 3, 4, 2), np.float32)
  edge = np.ones((1, 3, 4), np.float32)
  rw = np.asarray(random_walk.random_walk_scores(scores, edge, (12, 16), exp_times=1))
  assert np.all(rw == 0)
  assert np.all(np.asarray(random_walk.random_walk_labels(scores, edge, (12, 16))) == 0)


def test_invalid_arguments_are_named():
  with pytest.raises(ValueError, match="radius must be an int >= 2"):
    random_walk.directions(1)
  with pytest.raises(ValueError, match="same grid"):
    random_walk.propagate(np.zeros((1, 3, 4, 2)), np.zeros((1, 3, 5)))
  with pytest.raises(ValueError, match="exceeds 4x"):
    random_walk.random_walk_labels(np.zeros((1, 3, 4, 2)), np.zeros((1, 3, 4)), (13, 16))
