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


# ----------------------------------------------------------------------------- inputs


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
  crop_box = np.array([[0, 0, 32, 32], [4, 0, 32, 28], [0, 8, 20, 32], [5, 3, 29, 31]])
  mask_box = np.asarray(image_ops.scale_box(jnp.asarray(crop_box), STRIDE))
  valid = np.asarray(image_ops.box_mask(jnp.asarray(mask_box), (MASK_SIZE, MASK_SIZE)))
  seeds = np.where(valid, seeds, IGNORE).astype(np.int32)
  inside = np.asarray(image_ops.box_mask(jnp.asarray(crop_box), (IMAGE_SIZE, IMAGE_SIZE)))
  images = np.asarray(image_ops.normalize(image_u8)) * inside[..., None]
  # Labels: the tags whose class made it into the seed, as the data + RecurSeed would give.
  labels = classes_in(seeds).astype(np.float32)
  return images.astype(np.float32), seeds, probs.astype(np.float32), labels, crop_box, valid


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

MIX_SETTINGS = {
    "epm": epm.MixSettings(kind="epm", drop_covered_classes=True),
    "cutmix": epm.MixSettings(kind="cutmix", drop_covered_classes=True),
    "classmix": epm.MixSettings(kind="classmix"),
}


def check_mix(inputs, out, settings):
  """Every invariant of a mix, with the expected paste mask rebuilt from the references."""
  images, seeds, probs, labels, crop_box, valid = inputs
  out = {key: np.asarray(value) for key, value in out.items()}
  partner, paste = out["partner"], out["paste_mask"]
  assert sorted(partner) == list(range(len(partner)))
  assert out["images"].shape == images.shape and out["seeds"].shape == seeds.shape
  assert out["labels"].shape == labels.shape and out["labels"].dtype == labels.dtype

  # Images: x_j inside M (block-upsampled), x_i outside.
  paste_pixels = np.kron(paste, np.ones((STRIDE, STRIDE), bool))[..., None]
  np.testing.assert_array_equal(out["images"], np.where(paste_pixels, images[partner], images))

  # Seeds: seed_j on M, seed_i elsewhere; only the EPM edge band turns to ignore.
  edges = None
  if settings.kind == "epm":
    edges = reference_threshold_edges(reference_probability_edges(probs),
                                      settings.edge_low_th, settings.edge_sigma)
  source = np.where(paste, seeds[partner], seeds)
  changed = out["seeds"] != source
  assert np.all(out["seeds"][changed] == IGNORE)
  assert np.all(out["seeds"][source == IGNORE] == IGNORE)  # ignore stays ignore
  if edges is None:
    assert not changed.any()
  else:
    np.testing.assert_array_equal(changed, edges[partner] & reference_boundary_band(paste)
                                  & (seeds[partner] != seeds) & (source != IGNORE))

  # Paste masks.
  if settings.kind == "cutmix":
    rows, cols = paste.any(axis=2), paste.any(axis=1)
    np.testing.assert_array_equal(paste, rows[:, :, None] & cols[:, None, :])
    for line in np.concatenate([rows, cols]):
      assert np.all(np.diff(np.flatnonzero(line)) == 1)  # one contiguous span
  else:
    region_seeds = seeds
    if edges is not None:
      region_seeds = reference_fill_regions(seeds, edges, NUM_CLASSES, valid)
    pasted, present = classes_in(region_seeds[partner], paste), classes_in(region_seeds[partner])
    half = settings.kind == "classmix" or settings.class_subset == "half"
    np.testing.assert_array_equal(
        pasted.sum(1), (present.sum(1) + 1) // 2 if half else present.sum(1))
    np.testing.assert_array_equal(paste, np.stack(
        [np.isin(region_seeds[partner][b], np.flatnonzero(pasted[b]) + 1)
         for b in range(len(partner))]))

  # Tags: y_i (minus covered classes) plus the classes pasted from j, and nothing else.
  tags = labels > 0
  if settings.drop_covered_classes:
    tags &= ~(classes_in(seeds) & ~classes_in(seeds, ~paste))
  expected_labels = tags | classes_in(seeds[partner], paste)
  np.testing.assert_array_equal(out["labels"], expected_labels.astype(labels.dtype))
  assert np.all(out["labels"][classes_in(out["seeds"])] == 1)

  expected_box = np.concatenate([np.minimum(crop_box[:, :2], crop_box[partner, :2]),
                                 np.maximum(crop_box[:, 2:], crop_box[partner, 2:])], axis=1)
  np.testing.assert_array_equal(out["crop_box"], expected_box)


def run_mix_batch(rng, inputs, settings):
  return jitted_mix_batch(rng, *(jnp.asarray(x) for x in inputs[:5]), settings=settings)


@pytest.mark.parametrize("kind", list(MIX_SETTINGS))
def test_mix_batch_invariants(kind):
  inputs = random_batch()
  settings = MIX_SETTINGS[kind]
  for rng_seed in (0, 1):
    out = run_mix_batch(jax.random.key(rng_seed), inputs, settings)
    check_mix(inputs, out, settings)
    assert np.asarray(out["paste_mask"]).any()


@pytest.mark.parametrize("kind", list(MIX_SETTINGS))
def test_mixing_an_image_with_itself_changes_nothing(kind):
  # A batch of copies of one image: whatever the partners are, each image is mixed with itself.
  one = [x[3:4] for x in random_batch()]
  copies = [np.repeat(x, BATCH, axis=0) for x in one]
  out = run_mix_batch(jax.random.key(5), copies, MIX_SETTINGS[kind])
  for key, index in (("images", 0), ("seeds", 1), ("labels", 3), ("crop_box", 4)):
    np.testing.assert_array_equal(np.asarray(out[key]), copies[index], err_msg=key)


def test_epm_hand_made_pair_with_covered_class():
  """Image 0: a 2x2 class-1 object; image 1: a 4x4 class-2 object over it; swapped partners."""
  seeds = np.zeros((2, 8, 8), np.int32)
  seeds[0, 3:5, 3:5] = 1
  seeds[1, 2:6, 2:6] = 2
  probs = np.eye(NUM_CLASSES + 1, dtype=np.float32)[seeds]
  images = np.stack([np.full((32, 32, 3), -1.0), np.full((32, 32, 3), 1.0)]).astype(np.float32)
  labels = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
  crop_box = np.array([[0, 0, 32, 32], [0, 0, 30, 32]], np.int32)
  out = jitted_mix_with_partner(jnp.array([1, 0]), jax.random.key(0), jnp.asarray(images),
                                jnp.asarray(seeds), jnp.asarray(probs), jnp.asarray(labels),
                                jnp.asarray(crop_box), settings=MIX_SETTINGS["epm"])
  expected_seeds = np.zeros((2, 8, 8), np.int32)
  # Image 0 gets the 4x4 object: its inner edge ring differs from what lies below -> ignore.
  expected_seeds[0, 2:6, 2:6] = IGNORE
  expected_seeds[0, 3:5, 3:5] = 2
  # Image 1 gets the 2x2 object: all of it and its 4-neighbours are edges of image 0 in the band
  # and differ from image 1's labels; the band's diagonal corners are no edges and keep class 2.
  expected_seeds[1] = seeds[1]
  expected_seeds[1, 2:6, 3:5] = IGNORE
  expected_seeds[1, 3:5, 2:6] = IGNORE
  np.testing.assert_array_equal(np.asarray(out["seeds"]), expected_seeds)
  # Class 1 of image 0 is entirely covered (dropped); the pasted 2x2 object adds class 1 to image
  # 1 although the band hides its pixels in the seed.
  np.testing.assert_array_equal(np.asarray(out["labels"]), [[0, 1, 0, 0], [1, 1, 0, 0]])
  expected_images = images.copy()
  expected_images[0, 8:24, 8:24] = 1.0
  expected_images[1, 12:20, 12:20] = -1.0
  np.testing.assert_array_equal(np.asarray(out["images"]), expected_images)
  np.testing.assert_array_equal(np.asarray(out["crop_box"]), [[0, 0, 32, 32]] * 2)


def test_edge_band_stops_at_the_image_border():
  """Image 1 pastes a band of rows 0..2 (class 2 left, class 3 right) into an empty image 0."""
  seeds = np.zeros((2, 8, 8), np.int32)
  seeds[1, :3, :4], seeds[1, :3, 4:] = 2, 3
  probs = np.eye(NUM_CLASSES + 1, dtype=np.float32)[seeds]
  images = np.zeros((2, 32, 32, 3), np.float32)
  labels = np.array([[0, 0, 0, 0], [0, 1, 1, 0]], np.float32)
  crop_box = np.array([[0, 0, 32, 32]] * 2, np.int32)
  out = jitted_mix_with_partner(jnp.array([1, 0]), jax.random.key(0), jnp.asarray(images),
                                jnp.asarray(seeds), jnp.asarray(probs), jnp.asarray(labels),
                                jnp.asarray(crop_box), settings=MIX_SETTINGS["epm"])
  # The class 2 / 3 edge at the image border is inside M, not next to its boundary: it stays.
  expected_seeds = seeds[::-1].copy()
  expected_seeds[0, 2] = IGNORE  # M's last row: edges next to the boundary, labels differ
  expected_seeds[1] = seeds[1]  # image 0 pastes nothing
  np.testing.assert_array_equal(np.asarray(out["seeds"]), expected_seeds)
  np.testing.assert_array_equal(np.asarray(out["labels"]), [[0, 1, 1, 0], [0, 1, 1, 0]])


def test_bad_settings_and_shapes_are_reported():
  with pytest.raises(ValueError, match="kind"):
    epm.MixSettings(kind="mixup")
  with pytest.raises(ValueError, match="edge_source"):
    epm.MixSettings(edge_source="sobel")
  images, seeds, probs, labels, crop_box = (jnp.asarray(x) for x in random_batch()[:5])
  with pytest.raises(ValueError, match="labels"):
    epm.mix_with_partner(jnp.arange(BATCH), jax.random.key(0), images, seeds, probs,
                         labels[:, :2], crop_box, settings=epm.MixSettings())
  with pytest.raises(ValueError, match="multiple"):
    epm.mix_with_partner(jnp.arange(BATCH), jax.random.key(0), images[:, :30], seeds, probs,
                         labels, crop_box, settings=epm.MixSettings())
