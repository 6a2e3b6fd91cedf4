"""RecurSeed pseudo masks against hand-built inputs with known answers.

Grids are chosen so every resize is a small matrix written out by hand:
  * CAM grid 2x2 -> mask grid 4x4 (bilinear, half-pixel): rows of `UP`;
  * mask grid 4x4 -> CAM grid 2x2: rows of `DOWN` (the mean of each pair);
  * a 16 px image -> the 4x4 mask grid (align_corners=True): every 5th pixel, exactly.
The expected seeds follow the documented rules, written again in numpy.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax.refine import pamr as pamr_lib
from rsepm_jax.refine import recurseed

IGNORE = 255
# PyTorch bilinear, align_corners=False. 2 -> 4: source coordinates -0.25 (clamped to 0), 0.25,
# 0.75, 1.25 (clamped to the last pixel). 4 -> 2: source coordinates 0.5 and 2.5.
UP = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
DOWN = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])

# Three classes, the third untagged; its CAM is large and must never show.
LABELS = np.array([[1.0, 1.0, 0.0]], np.float32)
CAMS = np.stack([
    np.array([[4.0, 1.0], [0.2, -2.0]]),  # class 0: relu / max = [[1, .25], [.05, 0]]
    np.array([[-1.0, 2.0], [-1.0, 1.0]]),  # class 1: [[0, 1], [0, .5]]
    np.full((2, 2), 9.0),  # class 2, untagged
], axis=-1)[None].astype(np.float32)
# Decoder logits (background first) at the 4x4 mask grid: class 1 on the left, class 0 on the
# right, the reverse of the CAM's layout; the untagged class is as likely as either.
SEG_LOGITS = np.zeros((1, 4, 4, 4), np.float32)
SEG_LOGITS[0, :, :2, 2] = 3.0
SEG_LOGITS[0, :, 2:, 1] = 3.0
SEG_LOGITS[0, 3, 2:, 0] = 1.0
SEG_LOGITS[0, :, :, 3] = 3.0


def _resize(x, rows, cols):
  """`[B, H, W, C]` with `out = rows @ x @ cols^T` per image and channel."""
  return np.einsum("ih,bhwc,jw->bijc", rows, x, cols)


def _max_normalize(x):
  return x / (x.max(axis=(1, 2), keepdims=True) + 1e-5)


def _with_background(fg, gamma):
  background = np.clip(1.0 - fg.max(axis=-1, keepdims=True), 0.0, 1.0) ** gamma
  return np.concatenate([background, fg], axis=-1)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _threshold_seeds(gate_fg, label_fg, certain=0.55, uncertain=0.10):
  best = gate_fg.max(axis=-1)
  seeds = np.full(best.shape, IGNORE, np.int64)
  seeds[best >= certain] = label_fg.argmax(axis=-1)[best >= certain] + 1
  seeds[best <= uncertain] = 0
  return seeds


def _cam_source():
  return _max_normalize(np.maximum(CAMS, 0.0)) * LABELS[:, None, None, :]


def _decoder_source(normalize=True):
  foreground = _resize(_softmax(SEG_LOGITS.astype(np.float64))[..., 1:], DOWN, DOWN)
  return (_max_normalize(foreground) if normalize else foreground) * LABELS[:, None, None, :]


def _inputs(size=16, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(1, size, size, 3)).astype(np.float32)
  features = {name: rng.normal(size=(1, 2, 2, 4)).astype(np.float32) for name in ("C4", "C5")}
  return image, features


@functools.lru_cache(maxsize=None)
def _jitted_pseudo_mask(settings):
  """One compile per settings; `decoder_weight` stays traced."""
  return jax.jit(functools.partial(recurseed.pseudo_mask, settings=settings))


def _pseudo_mask(settings, decoder_weight, image, cams=CAMS, seg_logits=SEG_LOGITS, labels=LABELS,
                 features=None, crop_box=None):
  if features is None:
    features = _inputs()[1]
  if crop_box is None:
    crop_box = np.array([[0, 0, image.shape[1], image.shape[2]]] * image.shape[0], np.int32)
  seeds, probs = _jitted_pseudo_mask(settings)(
      jnp.asarray(image), jnp.asarray(cams), jnp.asarray(seg_logits), features,
      jnp.asarray(labels), jnp.asarray(crop_box), jnp.float32(decoder_weight))
  return np.asarray(seeds), np.asarray(probs)


# ------------------------------------------------------------------------------ source switch

IDENTITY_REFINEMENT = recurseed.Settings(use_scg=False, use_pamr=False,
                                         normalize_decoder_source=True)


def test_hand_resizes_match_the_documented_semantics():
  """The matrices above are PyTorch's bilinear resizes (checked on a ramp by hand)."""
  ramp = np.array([0.0, 4.0])
  np.testing.assert_allclose(UP @ ramp, [0.0, 1.0, 3.0, 4.0])
  np.testing.assert_allclose(DOWN @ np.array([0.0, 2.0, 4.0, 8.0]), [1.0, 6.0])


@pytest.mark.parametrize("decoder_weight", [0.0, 1.0, 0.25])
def test_source_is_the_cam_at_weight_0_and_the_decoder_at_weight_1(decoder_weight):
  image, _ = _inputs()
  seeds, probs = _pseudo_mask(IDENTITY_REFINEMENT, decoder_weight, image)
  source = (1 - decoder_weight) * _cam_source() + decoder_weight * _decoder_source()
  source_on_mask = _resize(source, UP, UP)
  # No value sits on a threshold, so float rounding cannot move a seed.
  assert np.min(np.abs(source_on_mask.max(-1) - 0.55)) > 1e-3
  assert np.min(np.abs(source_on_mask.max(-1) - 0.10)) > 1e-3
  np.testing.assert_allclose(probs, _with_background(source_on_mask, 2.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(seeds, _threshold_seeds(source_on_mask, source_on_mask))
  assert np.all(probs[..., 3] == 0)  # the untagged class never shows


def test_raw_decoder_source_is_the_softmax_foreground_of_the_tags():
  """The default: the decoder's foreground probabilities, not max-normalised."""
  image, _ = _inputs()
  settings = recurseed.Settings(use_scg=False, use_pamr=False)
  assert not settings.normalize_decoder_source
  seeds, probs = _pseudo_mask(settings, 1.0, image)
  source_on_mask = _resize(_decoder_source(normalize=False), UP, UP)
  np.testing.assert_allclose(probs, _with_background(source_on_mask, 2.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(seeds, _threshold_seeds(source_on_mask, source_on_mask))
  # Raw probabilities are never above their max-normalised values.
  assert np.all(source_on_mask <= _resize(_decoder_source(), UP, UP) + 1e-6)


def test_cam_and_decoder_sources_give_the_known_different_seeds():
  image, _ = _inputs()
  cam_seeds, _ = _pseudo_mask(IDENTITY_REFINEMENT, 0.0, image)
  decoder_seeds, _ = _pseudo_mask(IDENTITY_REFINEMENT, 1.0, image)
  # CAM: class 0 (seed 1) peaks top-left, class 1 (seed 2) top-right; the decoder swaps them.
  assert cam_seeds[0, 0, 0] == 1 and cam_seeds[0, 0, 3] == 2
  assert decoder_seeds[0, 0, 0] == 2 and decoder_seeds[0, 0, 3] == 1
  # The CAM's bottom-left corner is 0.05 -> background; the decoder is sure of class 1 there.
  assert cam_seeds[0, 3, 0] == 0 and decoder_seeds[0, 3, 0] == 2


# ------------------------------------------------------------------------------ confidence filter

BELOW_CERTAIN = np.nextafter(np.float32(0.55), np.float32(0))
ABOVE_UNCERTAIN = np.nextafter(np.float32(0.10), np.float32(1))
# 0.125 - 0.1f is exact in float32 (0.1f = 13421773 * 2^-27, 0.125 = 16777216 * 2^-27).
MARGIN_LOW = np.float32(0.125) - np.float32(0.1)


def _filter(probs, settings, source=None, valid=None):
  probs = np.asarray(probs, np.float32)[None, None]  # one image, one row of pixels
  if valid is None:
    valid = np.ones(probs.shape[:3], bool)
  if source is not None:
    source = jnp.asarray(np.asarray(source, np.float32)[None, None])
  return np.asarray(recurseed.confidence_filter(jnp.asarray(probs), jnp.asarray(valid), settings,
                                                source))[0, 0]


def test_margin_boundary_values_are_exact_in_float32():
  assert np.float32(0.125) - MARGIN_LOW == np.float32(0.1)
  assert BELOW_CERTAIN < np.float32(0.55) and ABOVE_UNCERTAIN > np.float32(0.10)


def test_threshold_rule_on_refined_probs_at_its_boundaries():
  settings = recurseed.Settings(filter_input="refined", confidence_rule="threshold")
  probs = [
      [0.0, 0.55, 0.2],  # exactly certain -> foreground class 1
      [0.0, 0.2, BELOW_CERTAIN],  # just below certain -> ignore
      [0.9, 0.10, 0.05],  # exactly uncertain -> background
      [0.9, 0.05, ABOVE_UNCERTAIN],  # just above uncertain -> ignore
      [0.0, 0.3, 0.9],  # class 2
  ]
  np.testing.assert_array_equal(_filter(probs, settings), [1, IGNORE, 0, IGNORE, 2])


def test_threshold_rule_on_the_source_labels_by_the_refined_argmax():
  settings = recurseed.Settings(filter_input="source", confidence_rule="threshold")
  # The refined probs alone would say "ignore" (max fg 0.3); the source decides confidence,
  # the refined probs the label: class 2 although the source prefers class 1.
  probs = [[0.4, 0.2, 0.3]] * 4 + [[0.1, 0.8, 0.1]]
  source = [
      [0.55, 0.0],  # exactly certain -> foreground, labelled by the refined argmax (2)
      [BELOW_CERTAIN, 0.0],  # ignore
      [0.0, 0.10],  # exactly uncertain -> background
      [ABOVE_UNCERTAIN, 0.0],  # ignore
      [0.05, 0.0],  # sure background although the refined probs are sure of class 1
  ]
  np.testing.assert_array_equal(_filter(probs, settings, source), [2, IGNORE, 0, IGNORE, 0])


def test_margin_rule_on_refined_probs_at_its_boundary():
  settings = recurseed.Settings(filter_input="refined", confidence_rule="margin")
  probs = [
      [0.0, 0.125, MARGIN_LOW],  # margin exactly 0.1 -> kept, class 1
      [0.0, np.nextafter(np.float32(0.125), np.float32(0)), MARGIN_LOW],  # just below -> ignore
      [0.7, 0.2, 0.1],  # background wins by 0.5 -> 0
      [0.45, 0.1, 0.45],  # a tie -> ignore
  ]
  np.testing.assert_array_equal(_filter(probs, settings), [1, IGNORE, 0, IGNORE])


def test_margin_rule_on_the_source_uses_its_gamma_background():
  # gamma 100: the background (1 - 0.125)^100 ~ 2e-6 is below both foreground values.
  settings = recurseed.Settings(filter_input="source", confidence_rule="margin", bg_gamma=100.0)
  probs = [[0.1, 0.2, 0.7]] * 2 + [[0.6, 0.3, 0.1]]
  source = [
      [0.125, MARGIN_LOW],  # margin exactly 0.1 -> kept, labelled by the refined argmax (2)
      [np.nextafter(np.float32(0.125), np.float32(0)), MARGIN_LOW],  # ignore
      [0.0, 0.0],  # background 1 vs 0 -> kept, label = argmax of probs incl. background (0)
  ]
  np.testing.assert_array_equal(_filter(probs, settings, source), [2, IGNORE, 0])


def test_margin_rule_on_the_source_depends_on_bg_gamma():
  probs = [[0.25, 0.5, 0.0]]
  source = [[0.5, 0.0]]
  # gamma 1: gate [0.5, 0.5, 0] -> margin 0 -> ignore; gamma 2: [0.25, 0.5, 0] -> 0.25 -> class 1.
  for gamma, expected in ((1.0, IGNORE), (2.0, 1)):
    settings = recurseed.Settings(filter_input="source", confidence_rule="margin", bg_gamma=gamma)
    assert _filter(probs, settings, source)[0] == expected


def test_filter_outside_valid_is_ignore():
  settings = recurseed.Settings(filter_input="refined")
  out = _filter([[0.0, 0.9, 0.0], [1.0, 0.0, 0.0]], settings, valid=np.array([[[False, False]]]))
  np.testing.assert_array_equal(out, [IGNORE, IGNORE])


def test_source_filter_without_a_source_is_an_error():
  settings = recurseed.Settings(filter_input="source")
  probs = jnp.zeros((1, 2, 2, 3))
  valid = jnp.ones((1, 2, 2), bool)
  with pytest.raises(ValueError, match="filter_input='source' needs source"):
    recurseed.confidence_filter(probs, valid, settings)
  with pytest.raises(ValueError, match="filter_input='source' needs source"):
    recurseed.confidence_filter(probs, valid, settings, jnp.zeros((1, 2, 2, 3)))


def test_unknown_settings_are_errors():
  with pytest.raises(ValueError, match="filter_input"):
    recurseed.Settings(filter_input="probs")
  with pytest.raises(ValueError, match="confidence_rule"):
    recurseed.Settings(confidence_rule="entropy")
  with pytest.raises(ValueError, match="rounds"):
    recurseed.Settings(rounds=0)


# ------------------------------------------------------------------------------ crop box


def test_seeds_are_ignore_outside_the_crop_box_on_the_stride_4_grid():
  """A 32 px crop, the 8x8 mask grid; boxes map with floor (top-left) and ceil (bottom-right)."""
  batch = 3
  rng = np.random.default_rng(1)
  image = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
  cams = np.ones((batch, 4, 4, 2), np.float32)  # class 0 sure everywhere
  seg_logits = np.zeros((batch, 8, 8, 3), np.float32)
  labels = np.array([[1.0, 0.0]] * batch, np.float32)
  features = {name: np.zeros((batch, 4, 4, 4), np.float32) for name in ("C4", "C5")}
  boxes = np.array([[5, 2, 27, 30], [8, 8, 24, 24], [13, 17, 14, 18]], np.int32)
  grid_boxes = [(1, 0, 7, 8), (2, 2, 6, 6), (3, 4, 4, 5)]  # (top, left, bottom, right)
  seeds, _ = _pseudo_mask(IDENTITY_REFINEMENT, 0.0, image, cams=cams, seg_logits=seg_logits,
                          labels=labels, features=features, crop_box=boxes)
  for b, (top, left, bottom, right) in enumerate(grid_boxes):
    expected = np.full((8, 8), IGNORE)
    expected[top:bottom, left:right] = 1
    np.testing.assert_array_equal(seeds[b], expected, err_msg=f"image {b}")


# ------------------------------------------------------------------------------ rounds


def _pamr(image, probs, settings):
  return np.asarray(pamr_lib.pamr(jnp.asarray(image, jnp.float32), jnp.asarray(probs, jnp.float32),
                                  num_iter=settings.pamr_iter,
                                  dilations=tuple(settings.pamr_dilations), sigma=settings.pamr_sigma))


def _two_region_image():
  """16 px image: dark left, bright right, noisy; its 4x4 mask-grid image is image[::5, ::5]."""
  rng = np.random.default_rng(2)
  image = rng.normal(scale=0.1, size=(1, 16, 16, 3)).astype(np.float32)
  image[:, :, 8:] += 2.0
  return image


def test_two_rounds_are_pamr_of_the_renormalised_first_round():
  image = _two_region_image()
  mask_image = image[:, ::5, ::5]  # align_corners 16 -> 4: source pixels 0, 5, 10, 15
  common = dict(use_scg=False, use_pamr=True, pamr_iter=4, pamr_dilations=(1, 2),
                filter_input="refined")
  one = recurseed.Settings(rounds=1, **common)
  two = recurseed.Settings(rounds=2, **common)
  tags = LABELS[:, None, None, :]

  first = _pamr(mask_image, _with_background(_resize(_cam_source(), UP, UP), one.bg_gamma), one)
  # Round two starts from round one's foreground, back on the CAM grid, max-normalised, tagged.
  next_source = _max_normalize(_resize(first[..., 1:], DOWN, DOWN)) * tags
  second = _pamr(mask_image, _with_background(_resize(next_source, UP, UP), two.bg_gamma), two)

  seeds_one, probs_one = _pseudo_mask(one, 0.0, image)
  seeds_two, probs_two = _pseudo_mask(two, 0.0, image)
  np.testing.assert_allclose(probs_one, first, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs_two, second, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(probs_two - probs_one)) > 1e-2
  np.testing.assert_array_equal(seeds_two, _threshold_seeds(second[..., 1:], second[..., 1:]))
  np.testing.assert_array_equal(seeds_one, _threshold_seeds(first[..., 1:], first[..., 1:]))
  assert np.any(seeds_one != seeds_two)


# ------------------------------------------------------------------------------ bg_gamma


def _gamma_inputs():
  image = _two_region_image()
  cams = np.random.default_rng(3).uniform(-0.5, 1.0, size=(1, 2, 2, 3)).astype(np.float32)
  return image, cams


@pytest.mark.parametrize("filter_input", ["source", "refined"])
def test_bg_gamma_changes_no_seed_under_the_threshold_rule(filter_input):
  image, cams = _gamma_inputs()
  results = [
      _pseudo_mask(recurseed.Settings(use_scg=False, pamr_iter=4, pamr_dilations=(1, 2),
                                      filter_input=filter_input, bg_gamma=gamma), 0.0, image,
                   cams=cams)
      for gamma in (1.0, 2.0, 5.0)]
  for seeds, probs in results[1:]:
    np.testing.assert_array_equal(seeds, results[0][0])
    assert np.max(np.abs(probs[..., 0] - results[0][1][..., 0])) > 1e-2  # the background moved
  assert len(np.unique(results[0][0])) > 1


def test_bg_gamma_changes_seeds_under_the_margin_rule_on_the_source():
  image, cams = _gamma_inputs()
  seeds = [
      _pseudo_mask(recurseed.Settings(use_scg=False, pamr_iter=4, pamr_dilations=(1, 2),
                                      filter_input="source", confidence_rule="margin",
                                      bg_gamma=gamma), 0.0, image, cams=cams)[0]
      for gamma in (1.0, 2.0)]
  assert np.any(seeds[0] != seeds[1])
