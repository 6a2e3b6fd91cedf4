"""Connected-component labelling (rsepm_spec 5.1 `get_CCL`) against `scipy.ndimage.label`."""
import jax
import numpy as np
import pytest
from scipy import ndimage

from rsepm_jax.refine import components

HEIGHT, WIDTH = 40, 48

jitted_label = jax.jit(components.label, static_argnames=("connectivity",))


def spiral(height, width):
  """One 4-connected path winding inwards, walls two pixels apart: `[H, W]` bool."""
  mask = np.zeros((height, width), bool)
  top, left, bottom, right = 0, 0, height - 1, width - 1
  while bottom - top >= 4 and right - left >= 4:
    mask[top, left:right + 1] = True
    mask[top:bottom + 1, right] = True
    mask[bottom, left:right + 1] = True
    mask[top + 2:bottom + 1, left] = True
    mask[top + 2, left:right - 1] = True
    top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
  return mask


def serpentine(height, width):
  """Every other row, joined alternately at the right and left ends: `[H, W]` bool."""
  mask = np.zeros((height, width), bool)
  mask[::2] = True
  for row in range(1, height - 1, 2):
    mask[row, width - 1 if row % 4 == 1 else 0] = True
  return mask


def make_masks():
  """Eight `[H, W]` masks: random at several densities (near percolation included), empty,
  full, and two long snakes."""
  rng = np.random.default_rng(7)
  random_masks = [rng.random((HEIGHT, WIDTH)) < density for density in (0.2, 0.5, 0.59, 0.8)]
  snakes = [spiral(HEIGHT, WIDTH), serpentine(HEIGHT, WIDTH)[:, ::-1]]
  assert all(ndimage.label(snake)[1] == 1 for snake in snakes)
  return np.stack(random_masks + [
      np.zeros((HEIGHT, WIDTH), bool), np.ones((HEIGHT, WIDTH), bool)] + snakes)


MASKS = make_masks()


def scipy_label(mask, connectivity):
  structure = np.ones((3, 3)) if connectivity == 8 else None
  return ndimage.label(mask, structure=structure)


def assert_same_partition(predicted, mask, connectivity, message):
  """Background identical and a bijection between our labels and scipy's."""
  reference, count = scipy_label(mask, connectivity)
  np.testing.assert_array_equal(predicted == 0, reference == 0, err_msg=message)
  pairs = set(zip(predicted[mask].tolist(), reference[mask].tolist()))
  # A bijection: as many (ours, scipy) pairs as labels on either side.
  assert len(pairs) == count == len(np.unique(predicted[mask])), message
  return reference, count


@pytest.mark.parametrize("connectivity", [4, 8])
def test_matches_scipy_up_to_relabelling(connectivity):
  labels = np.asarray(jitted_label(MASKS, connectivity=connectivity))
  assert labels.dtype == np.int32
  for index, (mask, predicted) in enumerate(zip(MASKS, labels)):
    reference, count = assert_same_partition(predicted, mask, connectivity, f"mask {index}")
    # Documented value: 1 + the smallest row-major flat index in the component.
    flat_index = np.arange(mask.size).reshape(mask.shape)
    for component in range(1, count + 1):
      expected = flat_index[reference == component].min() + 1
      assert np.all(predicted[reference == component] == expected), f"mask {index}"


@pytest.mark.parametrize("connectivity", [4, 8])
def test_many_small_random_masks(connectivity):
  # Rare configurations (a neighbour direction seen from one side only) need many samples.
  rng = np.random.default_rng(11)
  masks = rng.random((1024, 12, 12)) < rng.uniform(0.3, 0.7, (1024, 1, 1))
  labels = np.asarray(jitted_label(masks, connectivity=connectivity))
  for index, (mask, predicted) in enumerate(zip(masks, labels)):
    assert_same_partition(predicted, mask, connectivity, f"mask {index}")


def test_hand_computed_example():
  mask = np.array([[1, 1, 0, 0, 1],
                   [0, 1, 0, 1, 1],
                   [0, 0, 0, 0, 0],
                   [1, 0, 1, 0, 1],
                   [1, 0, 0, 1, 1]], bool)
  four = np.array([[1, 1, 0, 0, 5],
                   [0, 1, 0, 5, 5],
                   [0, 0, 0, 0, 0],
                   [16, 0, 18, 0, 20],
                   [16, 0, 0, 20, 20]])
  # The corner touch of (3, 2) and (4, 3) joins them under 8-connectivity.
  eight = np.where(four == 20, 18, four)
  np.testing.assert_array_equal(components.label(mask[None], connectivity=4)[0], four)
  np.testing.assert_array_equal(components.label(mask[None], connectivity=8)[0], eight)


def test_batched_equals_per_image():
  batched = np.asarray(jitted_label(MASKS, connectivity=4))
  for index in (1, 6):
    single = np.asarray(jitted_label(MASKS[index:index + 1], connectivity=4))
    np.testing.assert_array_equal(single[0], batched[index])


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="connectivity"):
    components.label(MASKS, connectivity=6)
  with pytest.raises(ValueError, match="mask must be"):
    components.label(MASKS[0])
