"""EdgePredictMix and the baseline mixes (rsepm_spec 5.2) against numpy / scipy / OpenCV
references, hand-made cases and the invariants of a mix."""
import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from rsepm_jax import image_ops
from rsepm_jax.refine import edge_predict_mix as epm

BATCH, IMAGE_SIZE, MASK_SIZE, NUM_CLASSES = 4, 32, 8, 4
STRIDE = IMAGE_SIZE // MASK_SIZE
IGNORE = 255

jitted_probability_edges = jax.jit(epm.probability_edges)
jitted_threshold_edges = jax.jit(epm.threshold_edges)
jitted_predicted_edges = jax.jit(epm.predicted_edges, static_argnames="settings")
jitted_fill_regions = jax.jit(epm.fill_regions, static_argnames="num_classes")
jitted_mix_batch = jax.jit(epm.mix_batch, static_argnames="settings")
jitted_mix_with_partner = jax.jit(epm.mix_with_partner, static_argnames="settings")


# ----------------------------------------------------------------------------- references


def reference_probability_edges(probs):
  """0.5 * max L1 distance to the in-image 4-neighbours, pixel by pixel, clipped to 1."""
  batch, height, width, _ = probs.shape
  edges = np.zeros((batch, height, width))
  for b in range(batch):
    for y in range(height):
      for x in range(width):
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
          if 0 <= ny < height and 0 <= nx < width:
            distance = np.abs(probs[b, y, x].astype(np.float64) - probs[b, ny, nx]).sum()
            edges[b, y, x] = max(edges[b, y, x], min(0.5 * distance, 1.0))
  return edges


def reference_threshold_edges(edge_map, low_th, sigma):
  edges = np.zeros(edge_map.shape, bool)
  for b, values in enumerate(edge_map):
    candidates = values[values >= low_th]
    if candidates.size:
      edges[b] = values >= min(1.0, (1.0 + sigma) * np.median(candidates))
  return edges


def reference_canny_on_grid(image_u8, settings, size):
  """OpenCV `get_edge` of each uint8 RGB image, then any-pooled onto the `size` grid."""
  pooled = []
  for image in image_u8:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    blurred = cv2.GaussianBlur(gray, (settings.canny_blur,) * 2, 0)
    edges = cv2.Canny(blurred, settings.canny_low, settings.canny_high) > 0
    blocks = edges.reshape(size[0], edges.shape[0] // size[0], size[1], edges.shape[1] // size[1])
    pooled.append(blocks.any(axis=(1, 3)))
  return np.stack(pooled)


def reference_fill_regions(seed, edges, num_classes, valid):
  """scipy 4-connected regions of the valid non-edge pixels, one at a time."""
  completed = seed.copy()
  for b in range(seed.shape[0]):
    regions, count = ndimage.label(~edges[b] & valid[b])  # default structure: 4-connected
    for region in range(1, count + 1):
      inside = regions == region
      certain = seed[b][inside & (seed[b] != IGNORE)]
      if certain.size:
        majority = np.argmax(np.bincount(certain, minlength=num_classes + 1))
        completed[b][inside & (seed[b] == IGNORE)] = majority
  completed[edges & (completed == 0)] = IGNORE
  return completed


def reference_dilate(mask):
  """Pixels with a mask pixel in their in-image 3x3 window (8-neighbours and itself)."""
  grown = np.zeros(mask.shape, bool)
  height, width = mask.shape[1:]
  for y in range(height):
    for x in range(width):
      grown[:, y, x] = mask[:, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any(axis=(1, 2))
  return grown


def reference_boundary_band(mask):
  """Pixels whose in-image 3x3 window holds both mask and non-mask pixels."""
  band = np.zeros(mask.shape, bool)
  height, width = mask.shape[1:]
  for y in range(height):
    for x in range(width):
      window = mask[:, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
      band[:, y, x] = window.any(axis=(1, 2)) & ~window.all(axis=(1, 2))
  return band


def classes_in(seed, where=None):
  """bool [B, C]: class c has a pixel c + 1 in `seed` (inside `where`)."""
  where = np.ones(seed.shape, bool) if where is None else where
  return np.stack([[np.any((seed[b] == c + 1) & where[b]) for c in range(NUM_CLASSES)]
                   for b in range(seed.shape[0])])


def label_grid(*rows):
  """int32 [h, w] from strings of labels, one per row; `x` is ignore (255)."""
  return np.array([[IGNORE if c == "x" else int(c) for c in row] for row in rows], np.int32)


# ----------------------------------------------------------------------------- inputs

# The crop boxes of `random_batch` in image pixels and on the mask grid (floor / ceil of / 4).
CROP_BOXES = np.array([[0, 0, 32, 32], [4, 0, 32, 28], [0, 8, 20, 32], [5, 3, 29, 31]])
MASK_BOXES = np.array([[0, 0, 8, 8], [1, 0, 8, 7], [0, 2, 5, 8], [1, 0, 8, 8]])


@functools.lru_cache(maxsize=None)
def random_batch(seed=0):
  """Smooth images, probabilities with tagged classes only, CF-like seeds and crop boxes."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, size=(BATCH, 4, 4, 3))
  image_u8 = np.kron(coarse, np.ones((1, 8, 8, 1))) + rng.integers(-6, 7, (BATCH, 32, 32, 3))
  image_u8 = np.clip(image_u8, 0, 255).astype(np.uint8)
  tags = rng.random((BATCH, NUM_CLASSES)) < 0.6
  tags[np.arange(BATCH), rng.integers(0, NUM_CLASSES, BATCH)] = True
  logits = np.kron(rng.normal(size=(BATCH, 3, 3, NUM_CLASSES + 1)) * 4,
                   np.ones((1, 3, 3, 1)))[:, :MASK_SIZE, :MASK_SIZE]
  logits[..., 1:][~np.broadcast_to(tags[:, None, None], logits[..., 1:].shape)] = -30.0
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  seeds = np.where(probs.max(-1) >= 0.55, probs.argmax(-1), IGNORE)
  crop_box = CROP_BOXES
  valid, inside = (np.zeros((BATCH, size, size), bool) for size in (MASK_SIZE, IMAGE_SIZE))
  for b in range(BATCH):
    (top, left, bottom, right), box = MASK_BOXES[b], crop_box[b]
    valid[b, top:bottom, left:right] = True
    inside[b, box[0]:box[2], box[1]:box[3]] = True
  seeds = np.where(valid, seeds, IGNORE).astype(np.int32)
  images = np.asarray(image_ops.normalize(image_u8)) * inside[..., None]
  # Labels: the tags whose class made it into the seed, as the data + RecurSeed would give.
  labels = classes_in(seeds).astype(np.float32)
  return images.astype(np.float32), seeds, probs.astype(np.float32), labels, crop_box, valid


@functools.lru_cache(maxsize=None)
def one_hot_batch(seed=0):
  """`random_batch`'s images and crop boxes with one-hot probabilities of two random rectangles
  per image (so the edges are the pixels with a differently labelled 4-neighbour) and seeds
  with 30% uncertain pixels and 8% random labels."""
  images, _, _, _, crop_box, valid = random_batch()
  rng = np.random.default_rng(seed)
  truth = np.zeros((BATCH, MASK_SIZE, MASK_SIZE), np.int32)
  for b in range(BATCH):
    for _ in range(2):
      height, width = rng.integers(3, 7, 2)
      top, left = rng.integers(0, MASK_SIZE + 1 - height), rng.integers(0, MASK_SIZE + 1 - width)
      truth[b, top:top + height, left:left + width] = rng.integers(1, NUM_CLASSES + 1)
  probs = np.eye(NUM_CLASSES + 1, dtype=np.float32)[truth]
  seeds = np.where(rng.random(truth.shape) < 0.3, IGNORE, truth)
  flip = rng.random(truth.shape) < 0.08
  seeds[flip] = rng.integers(0, NUM_CLASSES + 1, flip.sum())
  seeds = np.where(valid, seeds, IGNORE).astype(np.int32)
  return images, seeds, probs, classes_in(seeds).astype(np.float32), crop_box, valid


def as_uint8(images):
  return np.clip(np.round(np.asarray(image_ops.denormalize(jnp.asarray(images)))), 0, 255
                 ).astype(np.uint8)


# ----------------------------------------------------------------------------- edges


def test_probability_edges_on_a_square_region():
  inside_probs, outside_probs = np.array([0.1, 0.7, 0.2]), np.array([0.6, 0.1, 0.3])
  probs = np.tile(outside_probs, (1, 6, 6, 1)).astype(np.float32)
  probs[0, 2:4, 2:4] = inside_probs
  edges = np.asarray(jitted_probability_edges(jnp.asarray(probs)))
  expected = np.zeros((1, 6, 6))
  value = 0.5 * (0.5 + 0.6 + 0.1)
  expected[0, 2:4, 2:4] = value  # the whole 2x2 block touches the outside
  for y, x in ((1, 2), (1, 3), (4, 2), (4, 3), (2, 1), (3, 1), (2, 4), (3, 4)):
    expected[0, y, x] = value  # 4-neighbours of the block; its diagonal corners stay 0
  np.testing.assert_allclose(edges, expected, atol=1e-6)
  constant = np.asarray(jitted_probability_edges(jnp.asarray(np.tile(outside_probs, (1, 6, 6, 1)))))
  np.testing.assert_array_equal(constant, 0.0)


def test_probability_edges_matches_loop_reference():
  rng = np.random.default_rng(1)
  probs = rng.random((2, 5, 7, 4)).astype(np.float32) * 0.8  # not normalised: clipping matters
  np.testing.assert_allclose(np.asarray(jitted_probability_edges(jnp.asarray(probs))),
                             reference_probability_edges(probs), atol=1e-6)


@pytest.mark.parametrize("low_th, sigma", [(0.10, 0.25), (0.3, 0.0)])
def test_threshold_edges_matches_numpy_median(low_th, sigma):
  rng = np.random.default_rng(2)
  edge_map = rng.random((3, 7, 9)).astype(np.float32) ** 2
  edge_map[1] *= 0.05  # nothing reaches low_th: no edges
  edge_map[2, 0, :5] = 0.9  # odd count with sigma 0: the median value itself is an edge
  edge_map[2, 1:] = 0.0
  expected = reference_threshold_edges(edge_map, low_th, sigma)
  got = np.asarray(jitted_threshold_edges(jnp.asarray(edge_map), low_th, sigma))
  np.testing.assert_array_equal(got, expected)
  assert not got[1].any() and got[0].any()


def test_predicted_edges_match_opencv_canny_and_probability_references():
  images, _, probs, *_ = random_batch()
  probs = probs.copy()
  probs[:2] = probs[:2, :1, :1]  # constant maps: images 0 and 1 have Canny edges only
  settings = epm.MixSettings(edge_source="both")
  got = np.asarray(jitted_predicted_edges(jnp.asarray(probs), jnp.asarray(images), settings))
  canny_edges = reference_canny_on_grid(as_uint8(images), settings, (MASK_SIZE, MASK_SIZE))
  probability_edges = reference_threshold_edges(
      reference_probability_edges(probs), settings.edge_low_th, settings.edge_sigma)
  assert not probability_edges[:2].any() and canny_edges[:2].any()
  np.testing.assert_array_equal(got, canny_edges | probability_edges)
  assert not got.all()


# ----------------------------------------------------------------------------- completion


def test_fill_regions_matches_scipy_reference():
  rng = np.random.default_rng(3)
  for _ in range(3):
    seed = rng.integers(0, NUM_CLASSES + 1, size=(2, 8, 8)).astype(np.int32)
    seed[rng.random(seed.shape) < 0.5] = IGNORE
    edges = rng.random(seed.shape) < 0.3
    valid = np.ones(seed.shape, bool)
    valid[1, :, 6:] = False
    got = np.asarray(jitted_fill_regions(jnp.asarray(seed), jnp.asarray(edges), NUM_CLASSES,
                                         jnp.asarray(valid)))
    expected = reference_fill_regions(seed, edges, NUM_CLASSES, valid)
    np.testing.assert_array_equal(got, expected)
    assert (got != seed).any()


def test_fill_regions_ring_of_edges():
  seed = np.full((2, 8, 8), IGNORE, np.int32)
  edges = np.zeros((2, 8, 8), bool)
  edges[:, 1:7, 1:7] = True
  edges[:, 2:6, 2:6] = False  # a ring of edges around rows / cols 2..5
  seed[:, 1, 1:4] = 0  # background on the ring -> ignore
  seed[:, 6, 3] = 1  # a class on the ring stays
  seed[0, 3, 3] = 3  # the only certain pixel inside image 0
  seed[0, 0, 7] = 0  # the outside of image 0 has a certain background pixel
  seed[1, 2, 2], seed[1, 5, 5] = 2, 1  # a tie inside image 1: the smaller label wins
  got = np.asarray(jitted_fill_regions(jnp.asarray(seed), jnp.asarray(edges), NUM_CLASSES,
                                       jnp.ones(seed.shape, bool)))
  expected = seed.copy()
  expected[:, 1, 1:4] = IGNORE
  expected[0, 2:6, 2:6] = 3
  expected[1, 2:6, 2:6] = 1
  expected[1, 2, 2] = 2
  outside = ~edges[0] & ~np.pad(np.ones((4, 4), bool), 2)
  expected[0][outside] = 0
  np.testing.assert_array_equal(got, expected)  # image 1's outside has no certain pixel: 255


# ----------------------------------------------------------------------------- mixing


def epm_settings(mix_targets="completed", edge_band="pasted_edges", **kwargs):
  return epm.MixSettings(kind="epm", mix_targets=mix_targets, edge_band=edge_band,
                         drop_covered_classes=True, **kwargs)


TARGETS_AND_BANDS = [("completed", "pasted_edges"), ("completed", "label_change"),
                     ("seeds", "pasted_edges"), ("seeds", "label_change")]
RANDOM_MASK_SETTINGS = {
    "epm_half": epm_settings(class_subset="half"),
    "cutmix": epm.MixSettings(kind="cutmix", drop_covered_classes=True),
    "classmix": epm.MixSettings(kind="classmix"),
}
BATCH_SETTINGS = {"epm": epm_settings(), "cutmix": RANDOM_MASK_SETTINGS["cutmix"],
                  "classmix": RANDOM_MASK_SETTINGS["classmix"]}
PARTNERS = ([1, 2, 3, 0], [2, 1, 0, 3])  # a 4-cycle; 0 and 2 swapped, 1 and 3 with themselves


def reference_completion(inputs, settings):
  """EPM's edges (probability source) and completed seeds of every image, from the references."""
  _, seeds, probs, _, _, valid = inputs
  assert settings.edge_source == "probability" and settings.fill_regions
  edges = reference_threshold_edges(reference_probability_edges(probs), settings.edge_low_th,
                                    settings.edge_sigma)
  return edges, reference_fill_regions(seeds, edges, NUM_CLASSES, valid)


def foreground(seed):
  return (seed >= 1) & (seed <= NUM_CLASSES)


def reference_mix(inputs, partner, settings, paste=None):
  """The whole mix of row i with row j = partner[i], given the paste mask M of a random choice
  (CutMix, ClassMix, a half of the classes); EPM with all classes pastes j's completed
  foreground."""
  images, seeds, _, labels, crop_box, _ = inputs
  j = np.asarray(partner)
  base, pasted, region = seeds, seeds[j], seeds[j]
  if settings.kind == "epm":
    assert settings.ignore_edge_band
    edges, completed = reference_completion(inputs, settings)
    region = completed[j]
    if settings.mix_targets == "completed":
      base, pasted = completed, completed[j]
  if paste is None:
    assert settings.kind == "epm" and settings.class_subset == "all"
    paste = foreground(region)
  mixed_seeds = np.where(paste, pasted, base)
  if settings.kind == "epm":
    if settings.edge_band == "pasted_edges":
      band = edges[j] & reference_dilate(paste)
    else:
      band = edges[j] & reference_boundary_band(paste) & (pasted != base)
    mixed_seeds[band] = IGNORE
  tags = labels > 0
  if settings.drop_covered_classes:
    tags &= ~(classes_in(base) & ~classes_in(base, ~paste))
  paste_pixels = np.kron(paste, np.ones((STRIDE, STRIDE), bool))[..., None]
  box = np.concatenate([np.minimum(crop_box[:, :2], crop_box[j, :2]),
                        np.maximum(crop_box[:, 2:], crop_box[j, 2:])], axis=1)
  return {"images": np.where(paste_pixels, images[j], images), "seeds": mixed_seeds,
          "labels": (tags | classes_in(region, paste)).astype(labels.dtype), "crop_box": box,
          "paste_mask": paste, "partner": j}


def run_mix(partner, rng_seed, inputs, settings):
  out = jitted_mix_with_partner(jnp.asarray(partner), jax.random.key(rng_seed),
                                *(jnp.asarray(x) for x in inputs[:5]), settings=settings)
  return {key: np.asarray(value) for key, value in out.items()}


def assert_mix(out, expected):
  assert out["labels"].dtype == expected["labels"].dtype
  for key, value in expected.items():
    np.testing.assert_array_equal(out[key], value, err_msg=key)


@pytest.mark.parametrize("mix_targets, edge_band", TARGETS_AND_BANDS)
def test_epm_matches_the_references(mix_targets, edge_band):
  settings = epm_settings(mix_targets, edge_band)
  for inputs in (one_hot_batch(), random_batch()):
    for partner in PARTNERS:
      assert_mix(run_mix(partner, 0, inputs, settings), reference_mix(inputs, partner, settings))
  # The other knob values expect other targets for these inputs.
  expected = reference_mix(one_hot_batch(), PARTNERS[0], settings)["seeds"]
  for knobs in set(TARGETS_AND_BANDS) - {(mix_targets, edge_band)}:
    other = reference_mix(one_hot_batch(), PARTNERS[0], epm_settings(*knobs))["seeds"]
    assert not np.array_equal(expected, other), knobs


@pytest.mark.parametrize("name", list(RANDOM_MASK_SETTINGS))
def test_random_paste_masks_with_a_chosen_partner(name):
  settings = RANDOM_MASK_SETTINGS[name]
  inputs = one_hot_batch()
  partner = np.array(PARTNERS[0])
  region = inputs[1]
  if settings.kind == "epm":
    region = reference_completion(inputs, settings)[1]
  masks = []
  for rng_seed in (0, 1):
    out = run_mix(partner, rng_seed, inputs, settings)
    paste = out["paste_mask"]
    if settings.kind == "cutmix":
      rows, cols = paste.any(axis=2), paste.any(axis=1)
      np.testing.assert_array_equal(paste, rows[:, :, None] & cols[:, None, :])
      for line in np.concatenate([rows, cols]):
        assert np.all(np.diff(np.flatnonzero(line)) == 1)  # one contiguous span
    else:  # whole classes of j: a random ceil(n / 2) of its n classes
      pasted, present = classes_in(region[partner], paste), classes_in(region[partner])
      assert not (pasted & ~present).any()
      np.testing.assert_array_equal(pasted.sum(1), (present.sum(1) + 1) // 2)
      np.testing.assert_array_equal(paste, np.stack(
          [np.isin(region[j], np.flatnonzero(pasted[b]) + 1) for b, j in enumerate(partner)]))
    masks.append(paste)
    assert_mix(out, reference_mix(inputs, partner, settings, paste))
  assert all(mask.any() for mask in masks) and not np.array_equal(*masks)


@pytest.mark.parametrize("kind", list(BATCH_SETTINGS))
def test_mix_batch_draws_a_partner_permutation(kind):
  settings = BATCH_SETTINGS[kind]
  inputs = one_hot_batch()
  images, seeds = inputs[:2]
  own = reference_completion(inputs, settings)[1] if kind == "epm" else seeds
  partners = set()
  for rng_seed in range(3):
    out = jitted_mix_batch(jax.random.key(rng_seed), *(jnp.asarray(x) for x in inputs[:5]),
                           settings=settings)
    out = {key: np.asarray(value) for key, value in out.items()}
    assert sorted(out["partner"]) == list(range(BATCH))
    partners.add(tuple(out["partner"]))
    paste = out["paste_mask"]
    # Outside M each image keeps its pixels and targets (EPM: completed or ignore); inside M the
    # pixels (EPM: the completed foreground) come from one image of the batch.
    pixels = np.kron(paste, np.ones((STRIDE, STRIDE), bool))
    np.testing.assert_array_equal(out["images"][~pixels], images[~pixels])
    kept = out["seeds"][~paste]
    assert np.all((kept == own[~paste]) | ((kind == "epm") & (kept == IGNORE)))
    for i in range(BATCH):
      assert any(np.array_equal(out["images"][i][pixels[i]], images[k][pixels[i]])
                 for k in range(BATCH))
      if kind == "epm":
        assert any(np.array_equal(paste[i], foreground(own[k])) for k in range(BATCH))
  assert len(partners) > 1


@pytest.mark.parametrize("name", ["epm_seeds_label_change", "cutmix", "classmix"])
def test_mixing_an_image_with_itself_changes_nothing(name):
  settings = (epm_settings("seeds", "label_change") if name.startswith("epm")
              else RANDOM_MASK_SETTINGS[name])
  for inputs in (one_hot_batch(), random_batch()):
    out = run_mix(np.arange(BATCH), 0, inputs, settings)
    for key, index in (("images", 0), ("seeds", 1), ("labels", 3), ("crop_box", 4)):
      np.testing.assert_array_equal(out[key], inputs[index], err_msg=key)


def test_epm_mixing_an_image_with_itself_completes_its_seeds():
  """Defaults: the targets become the completed seeds, ignored on the edges in or next to M."""
  settings = epm_settings()
  for inputs in (one_hot_batch(), random_batch()):
    out = run_mix(np.arange(BATCH), 0, inputs, settings)
    for key, index in (("images", 0), ("labels", 3), ("crop_box", 4)):
      np.testing.assert_array_equal(out[key], inputs[index], err_msg=key)
    edges, completed = reference_completion(inputs, settings)
    expected = np.where(edges & reference_dilate(foreground(completed)), IGNORE, completed)
    np.testing.assert_array_equal(out["seeds"], expected)
    assert not np.array_equal(expected, inputs[1])


# ----------------------------------------------------------------------------- hand-made mixes


def mix_hand_made_pair(seeds, truth, settings, labels, crop_box=((0, 0, 32, 32),) * 2):
  """Mixes images 0 and 1 into each other; probabilities one-hot of `truth`, image i = i - 0.5.

  Two more images, mixed with themselves, give the batch size of the other tests, whose
  compiled mixes are reused; only the pair is returned.
  """
  probs = np.eye(NUM_CLASSES + 1, dtype=np.float32)[truth]
  images = np.stack([np.full((32, 32, 3), -0.5), np.full((32, 32, 3), 0.5)]).astype(np.float32)
  inputs = (images, seeds.astype(np.int32), probs, np.asarray(labels, np.float32),
            np.asarray(crop_box, np.int32))
  out = run_mix([1, 0, 2, 3], 0, [np.concatenate([x, x]) for x in inputs], settings)
  return {key: value[:2] for key, value in out.items()}


def two_objects():
  """Image 0: class 0 in rows / cols 5..7, seed uncertain at (7, 7); image 1: class 1 in rows /
  cols 1..4, seed uncertain at (2, 2) and class 2 at (3, 3).

  The edges (a differently labelled 4-neighbour) are each object's outer ring and the background
  4-neighbours of the ring. Image 0's edge-bounded interior (6..7, 6..7) completes (7, 7) to
  class 0; image 1's (2..3, 2..3) completes (2, 2) to class 1 (two votes against one). Background
  on edges becomes ignore: rows / cols 0 and 5 of image 1 next to its object, row / col 4 of
  image 0 next to its object. M of image 0 is all of image 1's object and vice versa.
  """
  truth = np.zeros((2, 8, 8), np.int32)
  truth[0, 5:, 5:] = 1
  truth[1, 1:5, 1:5] = 2
  seeds = truth.copy()
  seeds[0, 7, 7] = seeds[1, 2, 2] = IGNORE
  seeds[1, 3, 3] = 3
  return seeds, truth


TWO_OBJECTS_EXPECTED = {
    # Completed targets; all edges of the partner lie in or next to M and are ignored.
    ("completed", "pasted_edges"): [
        label_grid("0xxxx000", "xxxxxx00", "xx22xx00", "xx23xx00",
                   "xxxxxxxx", "0xxxx111", "0000x111", "0000x111"),
        label_grid("0xxxx000", "x2222x00", "x2222x00", "x2232x00",
                   "x2222xxx", "0xxxxxxx", "0000xx11", "0000xx11")],
    # Raw seeds (filled pixels stay uncertain, background on the own edges stays background).
    ("seeds", "pasted_edges"): [
        label_grid("0xxxx000", "xxxxxx00", "xxx2xx00", "xx23xx00",
                   "xxxxxx00", "0xxxx111", "00000111", "0000011x"),
        label_grid("00000000", "02222000", "02x22000", "02232000",
                   "02222xxx", "0000xxxx", "0000xx11", "0000xx1x")],
    # Old rule: only the partner's edges across M's boundary whose labels differ (the rings).
    ("seeds", "label_change"): [
        label_grid("00000000", "0xxxx000", "0xx2x000", "0x23x000",
                   "0xxxx000", "00000111", "00000111", "0000011x"),
        label_grid("00000000", "02222000", "02x22000", "02232000",
                   "02222000", "00000xxx", "00000x11", "00000x1x")],
}


@pytest.mark.parametrize("mix_targets, edge_band", list(TWO_OBJECTS_EXPECTED))
def test_epm_hand_made_completion(mix_targets, edge_band):
  """Completed labels of filled pixels and ignored background on edges reach the targets."""
  seeds, truth = two_objects()
  out = mix_hand_made_pair(seeds, truth, epm_settings(mix_targets, edge_band),
                           labels=[[1, 0, 0, 0], [0, 1, 1, 0]])
  expected_seeds = np.stack(TWO_OBJECTS_EXPECTED[mix_targets, edge_band])
  np.testing.assert_array_equal(out["seeds"], expected_seeds)
  if mix_targets == "completed":
    assert expected_seeds[0, 2, 2] == 2 and expected_seeds[1, 7, 7] == 1  # filled in the partner
    assert expected_seeds[0, 7, 7] == 1 and expected_seeds[1, 2, 2] == 2  # filled in the target
    assert expected_seeds[0, 4, 7] == IGNORE and seeds[0, 4, 7] == 0  # background on an edge
  expected_paste = np.zeros((2, 8, 8), bool)
  expected_paste[0, 1:5, 1:5] = expected_paste[1, 5:, 5:] = True
  np.testing.assert_array_equal(out["paste_mask"], expected_paste)
  np.testing.assert_array_equal(out["labels"], [[1, 1, 1, 0], [1, 1, 1, 0]])
  expected_images = np.stack([np.full((32, 32, 3), -0.5), np.full((32, 32, 3), 0.5)])
  expected_images[0, 4:20, 4:20] = 0.5
  expected_images[1, 20:, 20:] = -0.5
  np.testing.assert_array_equal(out["images"], expected_images.astype(np.float32))


COVERED_CLASS_EXPECTED = {
    # Image 0 gets the 4x4 object: its ring and the background 4-neighbours of the ring are edges;
    # image 1 gets the 2x2 object: all of it and its 4-neighbours are edges of image 0, its own
    # background next to the 4x4 object is on an edge; the diagonal corners are no edges.
    ("completed", "pasted_edges"): [
        label_grid("00000000", "00xxxx00", "0xxxxxx0", "0xx22xx0",
                   "0xx22xx0", "0xxxxxx0", "00xxxx00", "00000000"),
        label_grid("00000000", "00xxxx00", "0x2xx2x0", "0xxxxxx0",
                   "0xxxxxx0", "0x2xx2x0", "00xxxx00", "00000000")],
    # Old rule: image 0's ring differs from the background below; image 1's labels differ from the
    # 2x2 object and its 4-neighbours.
    ("seeds", "label_change"): [
        label_grid("00000000", "00000000", "00xxxx00", "00x22x00",
                   "00x22x00", "00xxxx00", "00000000", "00000000"),
        label_grid("00000000", "00000000", "002xx200", "00xxxx00",
                   "00xxxx00", "002xx200", "00000000", "00000000")],
}


@pytest.mark.parametrize("mix_targets, edge_band", list(COVERED_CLASS_EXPECTED))
def test_epm_hand_made_pair_with_covered_class(mix_targets, edge_band):
  """Image 0: a 2x2 class-0 object; image 1: a 4x4 class-1 object over it; swapped partners."""
  seeds = np.zeros((2, 8, 8), np.int32)
  seeds[0, 3:5, 3:5] = 1
  seeds[1, 2:6, 2:6] = 2
  out = mix_hand_made_pair(seeds, seeds, epm_settings(mix_targets, edge_band),
                           labels=[[1, 0, 0, 0], [0, 1, 0, 0]],
                           crop_box=[[0, 0, 32, 32], [0, 0, 30, 32]])
  np.testing.assert_array_equal(out["seeds"], np.stack(COVERED_CLASS_EXPECTED[mix_targets,
                                                                               edge_band]))
  # Class 0 of image 0 is entirely covered (dropped); the pasted 2x2 object adds class 0 to image
  # 1 although the band hides its pixels in the seed.
  np.testing.assert_array_equal(out["labels"], [[0, 1, 0, 0], [1, 1, 0, 0]])
  expected_images = np.stack([np.full((32, 32, 3), -0.5), np.full((32, 32, 3), 0.5)])
  expected_images[0, 8:24, 8:24] = 0.5
  expected_images[1, 12:20, 12:20] = -0.5
  np.testing.assert_array_equal(out["images"], expected_images.astype(np.float32))
  np.testing.assert_array_equal(out["crop_box"], [[0, 0, 32, 32]] * 2)


BORDER_EXPECTED = {
    # The class 1 / 2 edge inside M reaches the image border: ignored with the rest of M's edges.
    # Image 0 pastes nothing; image 1's background on its edges (row 3) becomes ignore.
    ("completed", "pasted_edges"): [
        label_grid("222xx333", "222xx333", "xxxxxxxx", "xxxxxxxx",
                   "00000000", "00000000", "00000000", "00000000"),
        label_grid("22223333", "22223333", "22223333", "xxxxxxxx",
                   "00000000", "00000000", "00000000", "00000000")],
    # Old rule: the class 1 / 2 edge is inside M, not next to its boundary (the image border is
    # none); only M's last row is ignored, row 3 is background in both images.
    ("seeds", "label_change"): [
        label_grid("22223333", "22223333", "xxxxxxxx", "00000000",
                   "00000000", "00000000", "00000000", "00000000"),
        label_grid("22223333", "22223333", "22223333", "00000000",
                   "00000000", "00000000", "00000000", "00000000")],
}


@pytest.mark.parametrize("mix_targets, edge_band", list(BORDER_EXPECTED))
def test_edge_band_at_the_image_border(mix_targets, edge_band):
  """Image 1 pastes a band of rows 0..2 (class 1 left, class 2 right) into an empty image 0."""
  seeds = np.zeros((2, 8, 8), np.int32)
  seeds[1, :3, :4], seeds[1, :3, 4:] = 2, 3
  out = mix_hand_made_pair(seeds, seeds, epm_settings(mix_targets, edge_band),
                           labels=[[0, 0, 0, 0], [0, 1, 1, 0]])
  np.testing.assert_array_equal(out["seeds"], np.stack(BORDER_EXPECTED[mix_targets, edge_band]))
  np.testing.assert_array_equal(out["paste_mask"][0], np.arange(8)[:, None] < np.full((8, 8), 3))
  assert not out["paste_mask"][1].any()
  np.testing.assert_array_equal(out["labels"], [[0, 1, 1, 0], [0, 1, 1, 0]])


def test_bad_settings_and_shapes_are_reported():
  for name in ("kind", "edge_source", "class_subset", "mix_targets", "edge_band"):
    with pytest.raises(ValueError, match=name):
      epm.MixSettings(**{name: "sobel"})
  images, seeds, probs, labels, crop_box = (jnp.asarray(x) for x in random_batch()[:5])
  with pytest.raises(ValueError, match="labels"):
    epm.mix_with_partner(jnp.arange(BATCH), jax.random.key(0), images, seeds, probs,
                         labels[:, :2], crop_box, settings=epm.MixSettings())
  with pytest.raises(ValueError, match="multiple"):
    epm.mix_with_partner(jnp.arange(BATCH), jax.random.key(0), images[:, :30], seeds, probs,
                         labels, crop_box, settings=epm.MixSettings())
