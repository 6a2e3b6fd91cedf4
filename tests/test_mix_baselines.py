"""Saliency Grafting and CDA mixes (issue 13) against NumPy references, hand-worked values and the
invariants of a mix; the batch fixtures are those of test_edge_predict_mix."""
import cv2
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from scipy import ndimage

from rsepm_jax import ablate
from rsepm_jax import losses
from rsepm_jax import parallel
from rsepm_jax import train_step
from rsepm_jax.configs import demo
from rsepm_jax.refine import edge_predict_mix as epm
from rsepm_jax.refine import saliency_grafting
from tests import test_edge_predict_mix as epm_test
from tests.test_edge_predict_mix import (BATCH, IGNORE, IMAGE_SIZE, MASK_BOXES, MASK_SIZE,
                                         NUM_CLASSES, PARTNERS, STRIDE, classes_in)

CAM_SIZE = 4  # CAM grid of the test batches: stride 8


def cams_for(inputs, seed=0):
  """Random raw CAMs `[B, 4, 4, C]`; untagged classes score highest, so using them shows."""
  labels = inputs[3]
  rng = np.random.default_rng(seed)
  cams = rng.normal(size=(BATCH, CAM_SIZE, CAM_SIZE, NUM_CLASSES)).astype(np.float32)
  return np.where(labels[:, None, None, :] > 0, cams, cams + 5.0).astype(np.float32)


def run(partner, rng_seed, inputs, settings, cams=None):
  out = epm_test.jitted_mix_with_partner(
      jnp.asarray(partner), jax.random.key(rng_seed), *(jnp.asarray(x) for x in inputs[:5]),
      settings=settings, cams=None if cams is None else jnp.asarray(cams))
  return {key: np.asarray(value) for key, value in out.items()}


def assert_pasted(out, inputs, moved_images, moved_seeds):
  """Outside M the target's image and seed, inside the (moved) partner's; the ignore pixels of
  the contributing seed stay ignore; the tags cover every class in the pasted seed pixels."""
  images, seeds = inputs[:2]
  paste = out["paste_mask"]
  pixels = np.kron(paste, np.ones((STRIDE, STRIDE), bool))[..., None]
  np.testing.assert_array_equal(out["images"], np.where(pixels, moved_images, images))
  contributing = np.where(paste, moved_seeds, seeds)
  np.testing.assert_array_equal(out["seeds"], contributing)
  assert np.all(out["seeds"][contributing == IGNORE] == IGNORE)
  covered = classes_in(out["seeds"], paste)
  assert np.all(out["labels"][covered] > 0)
  assert covered.any()


# ----------------------------------------------------------------------------- Saliency Grafting


def reference_saliency(cams, labels, valid, temperature):
  """float64: tagged relu-CAM max, OpenCV bilinear to the seed grid, max-norm, then softmax."""
  saliency = np.zeros(valid.shape)
  for b in range(valid.shape[0]):
    peak = np.max(np.where(labels[b] > 0, np.maximum(cams[b], 0.0), 0.0), axis=-1)
    raw = cv2.resize(peak.astype(np.float32), valid.shape[:0:-1], interpolation=cv2.INTER_LINEAR)
    raw = np.where(valid[b], raw, 0.0) / raw[valid[b]].max()
    if temperature:
      raw = np.where(valid[b], np.exp(raw / temperature), 0.0)
      raw /= raw.sum()
    saliency[b] = raw
  return saliency


def reference_grafting(inputs, cams, partner, settings, paste=None):
  """The whole mix of i with j = partner[i]; M given, or all candidates (keep probability 1)."""
  images, seeds, _, labels, crop_box, valid = inputs
  j = np.asarray(partner)
  saliency = reference_saliency(cams, labels, valid, settings.sg_temperature)
  threshold = settings.sg_threshold * saliency.sum((1, 2)) / valid.sum((1, 2))
  margin = np.abs(saliency[j] - threshold[j, None, None])
  assert margin[valid[j]].min() > 1e-5  # no cell at the threshold: float32 decides as float64
  candidates = valid[j] & (saliency[j] > threshold[j, None, None])
  if paste is None:
    paste = candidates
  assert not (paste & ~candidates).any()
  pasted = classes_in(seeds[j], paste)
  if settings.sg_label_mixing == "calibrated":
    lam = (saliency[j] * paste).sum((1, 2)) / (
        (saliency[j] * paste).sum((1, 2)) + (saliency * ~paste).sum((1, 2)))
    mixed_labels = labels + lam[:, None] * (np.maximum(labels[j], pasted) - labels)
  else:
    mixed_labels = ((labels > 0) | pasted).astype(np.float32)
  box = np.concatenate([np.minimum(crop_box[:, :2], crop_box[j, :2]),
                        np.maximum(crop_box[:, 2:], crop_box[j, 2:])], axis=1)
  return candidates, mixed_labels, box


SG_SETTINGS = {
    "softmax_calibrated": epm.MixSettings(kind="saliency_grafting", sg_keep_prob=1.0),
    "max_union": epm.MixSettings(kind="saliency_grafting", sg_keep_prob=1.0, sg_temperature=0.0,
                                 sg_threshold=0.8, sg_label_mixing="union"),
}


@pytest.mark.parametrize("name", list(SG_SETTINGS))
def test_saliency_grafting_with_all_patches_kept_matches_the_reference(name):
  settings = SG_SETTINGS[name]
  inputs = epm_test.random_batch()
  cams = cams_for(inputs)
  partner = PARTNERS[0]
  out = run(partner, 0, inputs, settings, cams)
  candidates, labels, box = reference_grafting(inputs, cams, partner, settings)
  np.testing.assert_array_equal(out["paste_mask"], candidates)
  assert_pasted(out, inputs, inputs[0][partner], inputs[1][partner])
  np.testing.assert_allclose(out["labels"], labels, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["crop_box"], box)
  assert (inputs[1][partner][candidates] == IGNORE).any()  # an ignore pixel was pasted
  if settings.sg_label_mixing == "calibrated":
    assert ((labels > 0) & (labels < 1)).any()  # soft labels
  # The untagged classes' CAMs would give another saliency (so M checks that they are left out).
  assert not np.allclose(reference_saliency(cams, inputs[3], inputs[5], settings.sg_temperature),
                         reference_saliency(cams, np.ones_like(inputs[3]), inputs[5],
                                            settings.sg_temperature))


def test_saliency_grafting_keeps_random_patches_of_the_candidates():
  settings = epm.MixSettings(kind="saliency_grafting", sg_patch=2)
  inputs = epm_test.random_batch()
  cams = cams_for(inputs)
  partner = PARTNERS[0]
  masks = []
  for rng_seed in (0, 1):
    out = run(partner, rng_seed, inputs, settings, cams)
    paste = out["paste_mask"]
    candidates, labels, box = reference_grafting(inputs, cams, partner, settings, paste)
    # Each 2x2 patch keeps all of its candidates or none of them.
    blocks = (paste == candidates).reshape(BATCH, 4, 2, 4, 2).all(axis=(2, 4))
    empty = (~paste).reshape(BATCH, 4, 2, 4, 2).all(axis=(2, 4))
    assert np.all(blocks | empty)
    assert_pasted(out, inputs, inputs[0][partner], inputs[1][partner])
    np.testing.assert_allclose(out["labels"], labels, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["crop_box"], box)
    assert 0 < paste.sum() < candidates.sum()
    masks.append(paste)
  assert not np.array_equal(*masks)


def test_calibrated_lambda_on_a_hand_worked_map():
  """Tagged classes 0 and 1 of the partner; S by hand; M = the top-left cell."""
  cams = np.zeros((1, 2, 2, 3), np.float32)
  cams[0, :, :, 0] = [[2.0, -1.0], [1.0, -3.0]]
  cams[0, :, :, 2] = 9.0  # untagged
  valid = np.ones((1, 2, 2), bool)
  got = saliency_grafting.saliency(jnp.asarray(cams), jnp.asarray([[1.0, 1.0, 0.0]]),
                                   jnp.asarray(valid), 0.5)
  # relu max over classes 0, 1: [[2, 0], [1, 0]] -> / 2 -> exp(s / 0.5) normalised.
  weights = np.array([[np.e ** 2, 1.0], [np.e, 1.0]])
  partner_saliency = weights / weights.sum()
  np.testing.assert_allclose(np.asarray(got)[0], partner_saliency, rtol=1e-6)
  target_saliency = np.array([[[0.1, 0.4], [0.25, 0.25]]])
  paste = np.array([[[True, False], [False, False]]])
  lam = saliency_grafting.calibrated_lambda(jnp.asarray(target_saliency, jnp.float32),
                                            jnp.asarray(partner_saliency[None], jnp.float32),
                                            jnp.asarray(paste))
  s00 = np.e ** 2 / (np.e ** 2 + np.e + 2.0)  # 0.6439...
  np.testing.assert_allclose(np.asarray(lam), [s00 / (s00 + 0.9)], rtol=1e-6)
  mixed = saliency_grafting.calibrated_labels(jnp.asarray([[1.0, 0.0, 1.0]]),
                                              jnp.asarray([[1.0, 1.0, 0.0]]), lam)
  expected_lam = s00 / (s00 + 0.9)
  np.testing.assert_allclose(np.asarray(mixed), [[1.0, expected_lam, 1.0 - expected_lam]],
                             rtol=1e-6)


def test_multilabel_soft_margin_takes_soft_labels():
  """BCE with targets in [0, 1], averaged over classes and batch (NumPy, float64)."""
  logits = np.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]], np.float32)
  labels = np.array([[1.0, 0.3, 0.0], [0.6, 1.0, 0.25]], np.float32)
  probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  expected = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
  np.testing.assert_allclose(
      float(losses.multilabel_soft_margin(jnp.asarray(logits), jnp.asarray(labels))), expected,
      rtol=1e-6)


# ----------------------------------------------------------------------------- CDA


def reference_cda(out, inputs, partner, settings):
  """From M, the chosen object and its offset (NumPy / scipy), checked against the rules; returns
  the partner's images and seeds moved by the offsets (a loop) and the offsets."""
  images, seeds, _, labels, crop_box, _ = inputs
  paste = out["paste_mask"]
  moved_images = np.full(images.shape, np.nan, np.float32)
  moved_seeds = np.full(seeds.shape, IGNORE, seeds.dtype)
  offsets, classes = [], []
  for b, j in enumerate(partner):
    present = classes_in(seeds[j][None])[0]
    values = np.unique(out["seeds"][b][paste[b]])  # M is then checked against this class
    if not present.any():
      assert not paste[b].any()
      continue
    assert len(values) == 1 and present[values[0] - 1]  # one class of the partner
    obj = seeds[j] == values[0]
    if settings.cda_instances == "component":
      regions, _ = ndimage.label(obj)
      obj = regions == 1 + np.argmax(np.bincount(regions.ravel())[1:])
    rows, cols = np.nonzero(obj)
    dy = np.nonzero(paste[b])[0].min() - rows.min()
    dx = np.nonzero(paste[b])[1].min() - cols.min()
    if not settings.cda_translate:
      assert dy == dx == 0
    top, left, bottom, right = MASK_BOXES[b]
    for first, last, shift, low, high in ((rows.min(), rows.max(), dy, top, bottom),
                                          (cols.min(), cols.max(), dx, left, right)):
      if last - first < high - low:  # fits in the target's valid cells: stays inside them
        assert low <= first + shift and last + shift < high
      else:
        assert 0 <= first + shift and last + shift < MASK_SIZE
    for y in range(MASK_SIZE):
      for x in range(MASK_SIZE):
        if 0 <= y - dy < MASK_SIZE and 0 <= x - dx < MASK_SIZE:
          assert paste[b, y, x] == obj[y - dy, x - dx]
          moved_seeds[b, y, x] = seeds[j, y - dy, x - dx]
        else:
          assert not paste[b, y, x]
    for y in range(IMAGE_SIZE):
      for x in range(IMAGE_SIZE):
        source_y, source_x = y - STRIDE * dy, x - STRIDE * dx
        if 0 <= source_y < IMAGE_SIZE and 0 <= source_x < IMAGE_SIZE:
          moved_images[b, y, x] = images[j, source_y, source_x]
    expected_labels = labels[b] > 0
    expected_labels[values[0] - 1] = True
    np.testing.assert_array_equal(out["labels"][b], expected_labels.astype(np.float32))
    moved_box = np.clip(crop_box[j] + STRIDE * np.array([dy, dx, dy, dx]), 0, IMAGE_SIZE)
    np.testing.assert_array_equal(out["crop_box"][b], np.concatenate(
        [np.minimum(crop_box[b, :2], moved_box[:2]), np.maximum(crop_box[b, 2:], moved_box[2:])]))
    offsets.append((dy, dx))
    classes.append(values[0])
  return moved_images, moved_seeds, offsets, classes


@pytest.mark.parametrize("instances", ["component", "class"])
def test_cda_pastes_one_moved_object_of_the_partner(instances):
  settings = epm.MixSettings(kind="cda", cda_instances=instances)
  inputs = epm_test.one_hot_batch()
  seeds = inputs[1]
  offsets, classes, partial = set(), set(), False
  for rng_seed in range(3):
    out = run(PARTNERS[0], rng_seed, inputs, settings)
    moved_images, moved_seeds, moved, chosen = reference_cda(out, inputs, PARTNERS[0], settings)
    assert_pasted(out, inputs, moved_images, moved_seeds)
    offsets.update(moved)
    classes.update(chosen)
    paste = out["paste_mask"]
    partial |= any(paste[b].sum() < np.sum(seeds[j] == out["seeds"][b][paste[b]][0])
                   for b, j in enumerate(PARTNERS[0]) if paste[b].any())
  assert len(offsets) > 2 and len(classes) > 1  # random places and classes
  assert partial == (instances == "component")  # a class of several components: one pasted


@pytest.mark.parametrize("settings", [
    epm.MixSettings(kind="saliency_grafting"),
    epm.MixSettings(kind="cda", cda_translate=False),
], ids=["saliency_grafting", "cda"])
def test_mixing_an_image_with_itself_changes_nothing(settings):
  for inputs in (epm_test.one_hot_batch(), epm_test.random_batch()):
    out = run(np.arange(BATCH), 0, inputs, settings, cams_for(inputs))
    assert out["paste_mask"].any()
    for key, index in (("images", 0), ("seeds", 1), ("labels", 3), ("crop_box", 4)):
      np.testing.assert_array_equal(out[key], inputs[index], err_msg=key)
  if settings.kind == "cda":
    moved = reference_cda(out, inputs, np.arange(BATCH), settings)
    assert all(offset == (0, 0) for offset in moved[2])


# ----------------------------------------------------------------------------- in the step


def mixed_on_devices(count, settings, local):
  mesh = Mesh(np.asarray(jax.devices()[:count]), (parallel.DATA_AXIS,))
  mix = jax.jit(jax.shard_map(
      lambda rng, batch: train_step.mix_across_devices(rng, batch, settings), mesh=mesh,
      in_specs=(P(), P(parallel.DATA_AXIS)), out_specs=P(parallel.DATA_AXIS)))
  return jax.device_get(mix(jax.random.key(3), local))


def test_one_and_two_devices_give_the_same_mixed_batch():
  """Saliency Grafting's CAMs travel with the batch (CDA draws from the same per-image keys)."""
  settings = epm.MixSettings(kind="saliency_grafting")
  inputs = epm_test.one_hot_batch()
  local = dict(zip(epm.BATCH_FIELDS, (jnp.asarray(x) for x in inputs[:5])))
  local["cams"] = jnp.asarray(cams_for(inputs))
  one, two = (mixed_on_devices(count, settings, local) for count in (1, 2))
  assert one["paste_mask"].any() and not np.array_equal(one["images"], inputs[0])
  for key in one:
    np.testing.assert_array_equal(two[key], one[key], err_msg=key)


def test_bad_settings_and_missing_cams_are_reported():
  for name, value in (("sg_label_mixing", "max"), ("cda_instances", "box"),
                      ("sg_temperature", -1.0), ("sg_threshold", 0.0), ("sg_patch", 0),
                      ("sg_keep_prob", 0.0)):
    with pytest.raises(ValueError, match=name):
      epm.MixSettings(**{name: value})
  inputs = epm_test.random_batch()
  with pytest.raises(ValueError, match="cams"):
    epm.mix_with_partner(jnp.arange(BATCH), jax.random.key(0),
                         *(jnp.asarray(x) for x in inputs[:5]),
                         settings=epm.MixSettings(kind="saliency_grafting"))
  with pytest.raises(ValueError, match="cams must be"):
    epm.mix_with_partner(jnp.arange(BATCH), jax.random.key(0),
                         *(jnp.asarray(x) for x in inputs[:5]),
                         settings=epm.MixSettings(kind="saliency_grafting"),
                         cams=jnp.zeros((BATCH, 4, 4, NUM_CLASSES + 1)))


def test_the_ablation_plans_their_rows():
  runs = ablate.plan_runs(demo.get_config("ablation"), ("saliency_grafting", "cda"))
  mixed = {run.name: (run.overrides["mix.kind"], run.rows) for run in runs
           if run.overrides["mix.kind"] != "none"}
  assert mixed == {"rs_saliency_grafting": ("saliency_grafting", {"RS+SaliencyGrafting": "RS"}),
                   "rs_cda": ("cda", {"RS+CDA": "RS"})}
