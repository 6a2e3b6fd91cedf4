"""IRNet affinity labels and loss (components_spec D.2) on hand-worked examples."""
import math

import jax
import numpy as np
import pytest

from rsepm_jax.refine import affinity_labels
from rsepm_jax.refine import random_walk

# Radius 2: directions (0, 1), (1, -1), (1, 0), (1, 1); sources rows 0..1, columns 1..2.
LABELS_3X4 = np.array([[0, 0, 1, 1],
                       [0, 255, 1, 2],
                       [0, 0, 2, 2]], np.int32)
# Worked by hand, [direction, row, column - 1]:
#   (0,1)=0: ->(0,2)=1 neg, ->(1,0)=0 bg+, ->(1,1)=255 invalid, ->(1,2)=1 neg
#   (0,2)=1: ->(0,3)=1 fg+, ->(1,1)=255 invalid, ->(1,2)=1 fg+, ->(1,3)=2 neg
#   (1,1)=255: all four invalid
#   (1,2)=1: ->(1,3)=2, ->(2,1)=0, ->(2,2)=2, ->(2,3)=2 all neg
POS_BG = {(1, 0, 0)}
POS_FG = {(0, 0, 1), (2, 0, 1)}
NEG = {(0, 0, 0), (3, 0, 0), (3, 0, 1), (0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1)}


def as_mask(cells, shape=(1, 4, 2, 2)):
  mask = np.zeros(shape, np.float32)
  for cell in cells:
    mask[(0,) + cell] = 1
  return mask


def test_pair_labels_by_hand():
  assert [tuple(d) for d in random_walk.directions(2)] == [(0, 1), (1, -1), (1, 0), (1, 1)]
  pairs = affinity_labels.pair_labels(LABELS_3X4[None], radius=2)
  np.testing.assert_array_equal(pairs.pos_bg, as_mask(POS_BG))
  np.testing.assert_array_equal(pairs.pos_fg, as_mask(POS_FG))
  np.testing.assert_array_equal(pairs.neg, as_mask(NEG))


def test_pair_labels_shape_for_radius_10():
  labels = np.zeros((2, 32, 40), np.int32)
  pairs = affinity_labels.pair_labels(labels, radius=10)
  assert pairs.pos_bg.shape == (2, 152, 23, 22)
  assert float(pairs.pos_bg.sum()) == 2 * 152 * 23 * 22
  assert float(pairs.pos_fg.sum()) == float(pairs.neg.sum()) == 0


def test_affinity_loss_by_hand():
  affinity = np.full((1, 4, 2, 2), 0.5, np.float32)  # invalid pairs must not count
  values = {(1, 0, 0): 0.9, (0, 0, 1): 0.5, (2, 0, 1): 0.8,
            (0, 0, 0): 0.1, (3, 0, 0): 0.2, (3, 0, 1): 0.3, (0, 1, 1): 0.0, (1, 1, 1): 0.1,
            (2, 1, 1): 0.2, (3, 1, 1): 0.4}
  for cell, value in values.items():
    affinity[(0,) + cell] = value
  affinity[0, 2, 1, 0] = 0.0  # an invalid pair with a huge would-be loss
  bg = -math.log(0.9 + 1e-5)
  fg = (-math.log(0.5 + 1e-5) - math.log(0.8 + 1e-5)) / 2
  neg = sum(-math.log(1 + 1e-5 - a) for a in (0.1, 0.2, 0.3, 0.0, 0.1, 0.2, 0.4)) / 7
  expected = (0.5 * bg + 0.5 * fg + neg) / 2
  pairs = affinity_labels.pair_labels(LABELS_3X4[None], radius=2)
  loss = affinity_labels.affinity_loss(affinity, pairs)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


def test_affinity_loss_without_pairs_is_zero_and_finite():
  ignore = np.full((1, 3, 4), 255, np.int32)
  pairs = affinity_labels.pair_labels(ignore, radius=2)
  loss, grad = jax.value_and_grad(affinity_labels.affinity_loss)(
      np.full((1, 4, 2, 2), 0.5, np.float32), pairs)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)
  # Background only: just the bg+ term, (1/2 L_bg+) / 2.
  background = affinity_labels.pair_labels(np.zeros((1, 3, 4), np.int32), radius=2)
  loss = affinity_labels.affinity_loss(np.full((1, 4, 2, 2), 0.5, np.float32), background)
  np.testing.assert_allclose(float(loss), -math.log(0.5 + 1e-5) / 4, rtol=1e-5)


def test_edge_loss_from_logits():
  # No edge anywhere: affinity 1, so positives cost ~0 and each negative -log(1e-5).
  logits = np.full((1, 3, 4), -30.0, np.float32)
  loss, grad = jax.jit(jax.value_and_grad(affinity_labels.edge_loss), static_argnums=2)(
      logits, LABELS_3X4[None], 2)
  # float32: 1 + 1e-5 - 1 is 1.0014e-5.
  np.testing.assert_allclose(float(loss), -math.log(1e-5) / 2, rtol=1e-3)
  assert np.all(np.isfinite(np.asarray(grad)))
  # A full edge: affinity 0, so each positive costs -log(1e-5) and negatives ~0.
  loss = affinity_labels.edge_loss(-logits, LABELS_3X4[None], 2)
  np.testing.assert_allclose(float(loss), -math.log(1e-5) / 2, rtol=1e-4)


def test_confident_labels_by_hand():
  scores = np.array([[[0.5, 0.1], [0.2, 0.25], [0.01, 0.04]],
                     [[0.1, 0.6], [0.3, 0.0], [0.05, 0.0]]], np.float32)[None]
  # fg = argmax([0.30, s]), bg = argmax([0.05, s]), ties to the background.
  expected = np.array([[1, 255, 0],
                       [2, 255, 0]])
  labels = affinity_labels.confident_labels(scores, fg_th=0.30, bg_th=0.05)
  np.testing.assert_array_equal(labels, expected[None])


def test_confident_labels_crf_removes_an_outlier():
  height, width = 12, 16
  image = np.full((1, height, width, 3), 120, np.uint8)  # grey background
  image[0, 2:10, 1:7] = (200, 40, 40)
  image[0, 2:10, 9:15] = (40, 40, 200)
  scores = np.zeros((1, height, width, 3), np.float32)
  scores[0, 2:10, 1:7, 0] = 0.8  # class 0 on the red object
  scores[0, 2:10, 9:15, 2] = 0.8  # class 2 on the blue object
  scores[0, 5, 3] = (0.0, 0.0, 0.9)  # one pixel of class 2 inside the red object
  scores[0, 3, 3] = (0.0, 0.0, 0.2)  # one unsure pixel there
  tags = np.array([[True, False, True]])
  clean = np.zeros((height, width), np.int32)
  clean[2:10, 1:7] = 1
  clean[2:10, 9:15] = 3
  plain = np.asarray(affinity_labels.confident_labels(scores))
  assert plain[0, 5, 3] == 3 and plain[0, 3, 3] == 255
  assert np.sum(plain[0] != clean) == 2
  refined = jax.jit(affinity_labels.confident_labels)(scores, images=image, tags=tags)
  np.testing.assert_array_equal(refined[0], clean)
  with pytest.raises(ValueError, match="needs tags"):
    affinity_labels.confident_labels(scores, images=image)


def test_reduce_labels_samples_pil_nearest_centres():
  labels = np.arange(8 * 12, dtype=np.int32).reshape(1, 8, 12)
  reduced = np.asarray(affinity_labels.reduce_labels(labels, 4))
  np.testing.assert_array_equal(reduced[0], labels[0][[2, 6]][:, [2, 6, 10]])
