"""Dense CRF (components_spec E.1) against a brute-force mean field with dense N x N kernels."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax.refine import crf

PARAMS = dict(pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0)
_jitted_crf = jax.jit(crf.dense_crf, static_argnames=("pos_xy_std",))


def run_crf(image, probs, num_iter=10, **overrides):
  """The jitted CRF, always called the same way (one compile per image size and pos_xy_std)."""
  return np.asarray(_jitted_crf(image, probs, num_iter, **{**PARAMS, **overrides}))


def exact_crf(image, probs, num_iter=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0,
              bi_rgb_std=3.0):
  """Mean field of Kraehenbuehl & Koltun in float64 with the full kernel matrices."""
  height, width, num_labels = probs.shape
  rows, cols = np.mgrid[:height, :width]
  xy = np.stack([cols, rows], -1).reshape(-1, 2).astype(np.float64)
  rgb = image.reshape(-1, 3).astype(np.float64)

  def normalised_kernel(features):
    kernel = np.exp(-0.5 * ((features[:, None] - features[None]) ** 2).sum(-1))
    norm = 1.0 / np.sqrt(kernel.sum(1))
    return norm[:, None] * kernel * norm[None]

  terms = [(pos_w, normalised_kernel(xy / pos_xy_std)),
           (bi_w, normalised_kernel(np.concatenate([xy / bi_xy_std, rgb / bi_rgb_std], 1)))]
  unary = -np.log(np.clip(probs.reshape(-1, num_labels).astype(np.float64), 1e-5, 1.0))

  def softmax(z):
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)

  q = softmax(-unary)
  for _ in range(num_iter):
    q = softmax(-unary + sum(w * kernel @ q for w, kernel in terms))
  return q.reshape(height, width, num_labels)


def smooth_scene(seed, height=12, width=16, num_labels=3, prob_noise=0.8):
  """Uint8 image of 3 flat colour regions with a gentle gradient and noise of std 2, and probs
  that favour each region's label (logit +1.5) under Gaussian logit noise of std `prob_noise`."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:height, :width]
  cut_x, cut_y = rng.integers(4, width - 4), rng.integers(3, height - 3)
  regions = (cols >= cut_x).astype(int) + 2 * ((rows >= cut_y) & (cols < cut_x))
  colours = rng.integers(40, 216, (3, 3))
  image = colours[regions] + rows[..., None] * 0.5 + rng.normal(0, 2, (height, width, 3))
  image = np.clip(image, 0, 255).astype(np.uint8)
  labels = regions % num_labels
  logits = 1.5 * np.eye(num_labels)[labels] + rng.normal(0, prob_noise, (height, width, num_labels))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return image, probs.astype(np.float32)


def test_smoothness_kernel_alone_matches_the_exact_mean_field():
  image, probs = smooth_scene(0)
  want = exact_crf(image, probs, **{**PARAMS, "bi_w": 0.0})
  # Only the Gaussian's tail beyond 4 std (exp(-8) of the centre) is dropped: measured 5e-6.
  np.testing.assert_allclose(run_crf(image, probs, bi_w=0.0), want, atol=2e-5)
  # A wider kernel (the PSA parameter set, sxy 3) as well.
  want = exact_crf(image, probs, **{**PARAMS, "bi_w": 0.0, "pos_xy_std": 3.0})
  got = run_crf(image, probs, bi_w=0.0, pos_xy_std=3.0)
  np.testing.assert_allclose(got, want, atol=5e-5)  # measured 2e-5


def test_full_crf_agrees_with_the_exact_mean_field():
  # The appearance kernel goes through the permutohedral lattice, an approximation.
  for seed in range(6):
    image, probs = smooth_scene(seed)
    want = exact_crf(image, probs, **PARAMS)
    got = run_crf(image, probs)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert np.abs(got - want).max() < 0.06  # measured 0.002-0.027
  # Noisier probabilities: measured agreement 0.984-1.0 (mean 0.995), the input's 0.59.
  agreement, unrefined = [], []
  for seed in range(6):
    image, probs = smooth_scene(seed, prob_noise=2.5)
    want = exact_crf(image, probs, **PARAMS).argmax(-1)
    agreement.append(np.mean(run_crf(image, probs).argmax(-1) == want))
    unrefined.append(np.mean(probs.argmax(-1) == want))
  assert np.mean(agreement) >= 0.98 and min(agreement) >= 0.95, agreement
  assert np.mean(unrefined) < 0.8, unrefined


def test_lattice_filter_approximates_a_unit_gaussian():
  # Filtered delta functions (1-D) are a Gaussian of std 1 up to a constant factor, within the
  # lattice's error: measured max 0.14, mean 0.014 of that factor.
  rng = np.random.default_rng(0)
  features = np.sort(rng.uniform(0, 8, 200)).astype(np.float32)[:, None]
  got = np.asarray(jax.jit(lambda f, v: crf.lattice_filter(crf.build_lattice(f), v))(
      features, jnp.eye(200)))
  want = np.exp(-0.5 * (features - features.T) ** 2)
  scale = (got * want).sum() / (want * want).sum()
  assert np.abs(got - scale * want).max() < 0.2 * scale
  assert np.abs(got - scale * want).mean() < 0.03 * scale


def test_outputs_are_distributions_and_zero_iterations_is_the_unary_softmax():
  image, probs = smooth_scene(1)
  probs = probs * np.where(np.arange(12)[:, None, None] < 6, 0.5, 1.0)  # not normalised
  probs[0, 0] = [0.0, 1e-7, 1.0]
  out = run_crf(image, probs)
  assert out.shape == probs.shape and out.dtype == np.float32
  assert (out >= 0).all()
  np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
  clipped = np.clip(probs, 1e-5, 1.0)
  np.testing.assert_allclose(run_crf(image, probs, num_iter=0),
                             clipped / clipped.sum(-1, keepdims=True), rtol=1e-5)


def test_constant_image_and_confident_probs_keep_their_labels():
  labels = np.zeros((12, 16), int)
  labels[:, 10:] = 1
  labels[3:9, 3:7] = 2
  probs = np.where(np.eye(3, dtype=bool)[labels], 0.9, 0.05).astype(np.float32)
  image = np.full((12, 16, 3), 128, np.uint8)
  np.testing.assert_array_equal(run_crf(image, probs).argmax(-1), labels)


def test_batched_form_equals_one_image_at_a_time():
  scenes = [smooth_scene(seed) for seed in (3, 4)]
  images = np.stack([s[0] for s in scenes])
  probs = np.stack([s[1] for s in scenes])
  batched = jax.jit(functools.partial(crf.dense_crf_batch, **PARAMS))(images, probs)
  for i, (image, p) in enumerate(scenes):
    np.testing.assert_allclose(np.asarray(batched[i]), run_crf(image, p), atol=1e-6)


def test_shape_errors_name_the_argument():
  with pytest.raises(ValueError, match=r"image must be \[H, W, 3\]"):
    crf.dense_crf(np.zeros((4, 4), np.uint8), np.ones((4, 4, 2), np.float32))
  with pytest.raises(ValueError, match=r"probs must be \[H, W, K\] on the image grid"):
    crf.dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((4, 5, 2), np.float32))


def test_label_agreement_with_pydensecrf():
  """pydensecrf (or pydensecrf2, which imports as such) is optional: skipped unless installed."""
  densecrf = pytest.importorskip("pydensecrf.densecrf")
  agreement = []
  for seed in range(6):
    image, probs = smooth_scene(seed, 48, 64, prob_noise=2.5)
    model = densecrf.DenseCRF2D(64, 48, 3)
    model.setUnaryEnergy(np.ascontiguousarray(
        -np.log(np.clip(probs, 1e-5, 1.0)).reshape(-1, 3).T.astype(np.float32)))
    model.addPairwiseGaussian(sxy=1, compat=3)
    model.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
    want = np.array(model.inference(10)).reshape(3, 48, 64).argmax(0)
    agreement.append(np.mean(run_crf(image, probs).argmax(-1) == want))
  # Measured with pydensecrf2 1.1: 0.997-1.0.
  assert np.mean(agreement) >= 0.99 and min(agreement) >= 0.98, agreement
