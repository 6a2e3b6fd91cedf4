"""Canny (rsepm_spec 5.1 `get_edge`) against OpenCV's `Canny(GaussianBlur(gray, (5, 5), 0))`."""
import cv2
import jax
import numpy as np
import pytest
from scipy import ndimage

from rsepm_jax.refine import canny as canny_lib

HEIGHT, WIDTH = 64, 80

# Thresholds are traced: one compile per (batch shape, blur size).
jitted_canny = jax.jit(canny_lib.canny, static_argnames=("blur_ksize",))


def make_test_images():
  """Six deterministic uint8 grey images `[6, 64, 80]` with varied structure."""
  rng = np.random.default_rng(1234)
  rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
  shapes = 40 + 100 * cols / WIDTH + 50 * rows / HEIGHT
  shapes[(rows - 30) ** 2 + (cols - 35) ** 2 < 14 ** 2] = 200
  shapes[8:24, 52:74] = 20
  shapes[(rows > 40) & (cols > 50) & (rows - 40 > cols - 50)] = 120
  texture = 128 + 60 * np.sin(cols / 4) * np.cos(rows / 6) + rng.normal(0, 8, (HEIGHT, WIDTH))
  blobs = np.full((HEIGHT, WIDTH), 128.0)
  for _ in range(30):
    centre_row, centre_col = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
    spread, amplitude = rng.uniform(2, 12), rng.uniform(-90, 90)
    blobs += amplitude * np.exp(
        -((rows - centre_row) ** 2 + (cols - centre_col) ** 2) / (2 * spread ** 2))
  checker = np.where((rows // 8 + cols // 8) % 2 == 0, 60, 180) + rng.normal(0, 20, (HEIGHT, WIDTH))
  # Integer steps give many equal magnitudes, so NMS tie-breaking decides the result.
  staircase = 45 * np.floor(cols / 16) + 25 * np.floor(rows / 16)
  noise = rng.uniform(0, 255, (HEIGHT, WIDTH))
  images = np.stack([shapes, texture, blobs, checker, staircase, noise])
  return np.clip(np.round(images), 0, 255).astype(np.uint8)


IMAGES = make_test_images()


def opencv_canny(image, low, high, blur_ksize=5):
  """The RS+EPM `get_edge` pipeline on one uint8 image -> bool `[H, W]`."""
  if blur_ksize > 1:
    image = cv2.GaussianBlur(image, (blur_ksize, blur_ksize), 0)
  return cv2.Canny(image, low, high) > 0


def tolerant_f1(predicted, reference):
  """Edge F1 where a pixel matches if the other map has an edge within 1 pixel (8-neighbours).

  Two empty maps agree perfectly (F1 = 1).
  """
  if not predicted.any() and not reference.any():
    return 1.0
  window = np.ones((3, 3), bool)
  near_reference = ndimage.binary_dilation(reference, window)
  near_predicted = ndimage.binary_dilation(predicted, window)
  precision = (predicted & near_reference).sum() / max(predicted.sum(), 1)
  recall = (reference & near_predicted).sum() / max(reference.sum(), 1)
  return 2 * precision * recall / max(precision + recall, 1e-12)


def compare_with_opencv(low, high, blur_ksize=5):
  """Per image `(tolerant F1, mismatched pixels, reference edge pixels)`."""
  edges = np.asarray(jitted_canny(IMAGES.astype(np.float32), low, high, blur_ksize=blur_ksize))
  stats = []
  for image, predicted in zip(IMAGES, edges):
    reference = opencv_canny(image, low, high, blur_ksize)
    stats.append((tolerant_f1(predicted, reference), int((predicted != reference).sum()),
                  int(reference.sum())))
  return stats


def test_opencv_kernel_and_blur_match():
  for ksize in (3, 5, 7, 9, 11, 15):
    np.testing.assert_allclose(canny_lib.gaussian_kernel_1d(ksize),
                               cv2.getGaussianKernel(ksize, 0).ravel(), atol=1e-7)
  blurred = np.asarray(canny_lib.gaussian_blur(IMAGES.astype(np.float32), 5))
  expected = np.stack([cv2.GaussianBlur(image, (5, 5), 0) for image in IMAGES])
  np.testing.assert_array_equal(blurred, expected)


def test_unrounded_blur_is_reflect_101_correlation():
  # scipy's "mirror" border is OpenCV's BORDER_REFLECT_101.
  kernel = np.outer(cv2.getGaussianKernel(7, 0), cv2.getGaussianKernel(7, 0))
  expected = ndimage.correlate(IMAGES[2].astype(np.float64), kernel, mode="mirror")
  blurred = canny_lib.gaussian_blur(IMAGES[2:3].astype(np.float32), 7, round_blur=False)
  np.testing.assert_allclose(np.asarray(blurred)[0], expected, atol=1e-3)


@pytest.mark.parametrize("low, high, blur_ksize", [(10, 100, 5), (50, 150, 5), (10, 100, 0)])
def test_matches_opencv_exactly(low, high, blur_ksize):
  stats = compare_with_opencv(low, high, blur_ksize)
  assert sum(reference for _, _, reference in stats) > 1000, stats
  for index, (f1, mismatched, reference) in enumerate(stats):
    assert f1 >= 0.95, f"image {index}: F1 {f1:.4f}, all stats {stats}"
    assert mismatched == 0, f"image {index}: {mismatched} of {reference} pixels differ: {stats}"


def test_swapped_thresholds_match_opencv():
  # OpenCV swaps low > high; so do we.
  assert all(mismatched == 0 for _, mismatched, _ in compare_with_opencv(100, 10))


def test_batched_equals_per_image():
  images = IMAGES.astype(np.float32)
  batched = np.asarray(jitted_canny(images, 10.0, 100.0))
  for index in range(len(images)):
    single = np.asarray(jitted_canny(images[index:index + 1], 10.0, 100.0))
    np.testing.assert_array_equal(single[0], batched[index])


def test_hysteresis_follows_weak_chains_only_from_strong_pixels():
  # Without blur a vertical step of height s has L1 magnitude 4 s. The step 0 -> 30 at column
  # 10 (magnitude 120: weak for thresholds 10 / 200) touches the strong step 0 -> 80 in rows
  # 0..7, so it is kept in every row; the separate weak step 30 -> 60 at column 30 is dropped.
  image = np.zeros((1, 40, 40), np.float32)
  image[0, :, 10:] = 30
  image[0, :8, 10:20] = 80
  image[0, :, 30:] = 60
  edges = np.asarray(jitted_canny(image, 10.0, 200.0, blur_ksize=0))[0]
  assert edges[:, 9:11].any(axis=1).all()
  assert not edges[:, 28:32].any()


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="gray must be"):
    canny_lib.canny(IMAGES[0].astype(np.float32))
  with pytest.raises(ValueError, match="blur_ksize"):
    canny_lib.canny(IMAGES[:1].astype(np.float32), blur_ksize=4)
