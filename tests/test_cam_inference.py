"""Multi-scale CAM inference of CAM-only networks (components spec A.5, IRNet's make_cam) against a
NumPy / OpenCV loop over the views on a stub network, and its use by the paper eval's seed sweep
(A.6), the exports and the modes (`config_check.check_mode`)."""
import cv2
import numpy as np
import pytest
from etils import epath

from rsepm_jax import config_check
from rsepm_jax import export
from rsepm_jax import inference
from rsepm_jax import paper_eval
from rsepm_jax import random_walk_export
from rsepm_jax.configs import demo
from tests import test_inference
from tests import test_paper_eval
from tests import test_random_walk_export

NUM_CLASSES = test_inference.NUM_CLASSES
STRIDE = test_inference.CAM_STRIDE
SCALES = (1.0, 0.5)


def cam_net():
  return test_inference.StubNet(with_decoder=False)


def reference(image, variables, scales, hflip, straight_to_image=False, unflip_at_image=False):
  """A.5 view by view: bilinear (OpenCV, half-pixel) view of int(h*s) x int(w*s); the stub's CAM
  grid; A_s = relu(F) + relu(F_flip) un-flipped on the grid; each A_s bilinearly resized to
  stride * ceil(H / stride) and cropped to H x W; summed over the scales; each class over its
  max + 1e-5 ("cams"); "rw": each A_s resized to ceil(H / 4) x ceil(W / 4), summed. Mutations: `straight_to_image` resizes A_s to H x W directly; `unflip_at_image`
  un-flips the flipped view's map after its resize instead of on the grid."""
  cam = variables["params"]["cam"]
  height, width = image.shape[:2]
  up_h, up_w = -(-height // STRIDE) * STRIDE, -(-width // STRIDE) * STRIDE
  x = ((image - test_inference.MEAN) / test_inference.STD).astype(np.float32)

  def resized(maps):
    if straight_to_image:
      return cv2.resize(maps, (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(maps, (up_w, up_h), interpolation=cv2.INTER_LINEAR)[:height, :width]

  total, rw, scores = 0.0, 0.0, []
  for scale in scales:
    view = cv2.resize(x, (int(width * scale), int(height * scale)),
                      interpolation=cv2.INTER_LINEAR)
    for flip in (False, True)[:1 + hflip]:
      logits = (view[:, ::-1] if flip else view)[::STRIDE, ::STRIDE] @ cam
      scores.append(1 / (1 + np.exp(-logits.mean(axis=(0, 1)))))
      heat = np.maximum(logits, 0).astype(np.float32)
      rw = rw + cv2.resize(heat[:, ::-1] if flip else heat, (-(-width // 4), -(-height // 4)),
                           interpolation=cv2.INTER_LINEAR)
      if flip and unflip_at_image:
        total = total + resized(heat)[:, ::-1]
      else:
        total = total + resized(heat[:, ::-1] if flip else heat)
  return {"pred_class": np.mean(scores, axis=0), "sum": total, "rw": rw,
          "cams": total / (total.max(axis=(0, 1)) + 1e-5)}


@pytest.mark.parametrize("size, hflip", [((32, 32), True), ((27, 21), True), ((27, 21), False)])
def test_cam_only_networks_follow_a5(size, hflip):
  """32 x 32: the stride-8 grid covers the image; 27 x 21: it does not (views 27x21 and 13x10)."""
  image = np.random.RandomState(1).randint(0, 256, size + (3,)).astype(np.uint8)
  variables = test_inference.stub_variables(2)
  got = inference.multiscale(cam_net(), variables, image, SCALES, hflip)
  want = reference(image, variables, SCALES, hflip)
  assert got["rule"] == "cam" and got["pred_mask"].shape == size + (NUM_CLASSES + 1,)
  np.testing.assert_array_equal(got["pred_mask"][..., 0], 0.0)
  np.testing.assert_allclose(got["pred_mask"][..., 1:], want["sum"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["cams"], want["cams"], atol=2e-5)
  np.testing.assert_allclose(got["pred_class"], want["pred_class"], atol=2e-6)
  np.testing.assert_allclose(got["rw_cams"], want["rw"], rtol=1e-5, atol=1e-5)
  if size[0] % STRIDE:  # the two mutations are caught where the grid overhangs the image
    for mutation in ("straight_to_image", "unflip_at_image")[:1 + hflip]:
      wrong = reference(image, variables, SCALES, hflip, **{mutation: True})["cams"]
      assert np.abs(wrong - want["cams"]).max() > 1e-2, mutation


def test_cam_only_images_batched_and_bucketed_each_get_their_own_result():
  rng = np.random.RandomState(3)
  images = [rng.randint(0, 256, size + (3,)).astype(np.uint8)
            for size in ((27, 21), (32, 32), (27, 21), (25, 20))]
  variables = test_inference.stub_variables(4)
  for bucket in (0, 32):  # 32: every image shares the views' padded shapes
    got = inference.multiscale_many(cam_net(), variables, images, SCALES, True, bucket,
                                    max_batch=2)
    for image, result in zip(images, got):
      want = reference(image, variables, SCALES, True)
      np.testing.assert_allclose(result["cams"], want["cams"], atol=2e-5)
      np.testing.assert_allclose(result["pred_class"], want["pred_class"], atol=2e-6)
      np.testing.assert_allclose(result["rw_cams"], want["rw"], rtol=1e-5, atol=1e-5)


def paper_config():
  config = demo.get_config("smoke")
  config.data.num_classes = NUM_CLASSES
  config.inference.scales = SCALES
  return config


def test_paper_eval_of_a_cam_only_network_sweeps_the_a5_cams_by_hand():
  """The seed sweep (A.6): argmax([th, hr_cam of the GT tags]); the paper head (no CRF, GT tags):
  the background of config.inference ("power": (1 - max seed) ** bg_gamma)."""
  config = paper_config()
  config.eval.crf, config.eval.gate_by_tags, config.eval.seed_sweep = False, True, True
  config.eval.cam_threshold_min, config.eval.cam_threshold_max = 0.2, 0.6
  config.eval.cam_threshold_step = 0.2
  batch, crops = test_paper_eval.records(((27, 21), (27, 21)))  # tags (0, 1, 0) and (1, 0, 1)
  variables = test_inference.stub_variables()
  counts = paper_eval.stream_confusion(cam_net(), variables, config, [batch])
  num_labels = NUM_CLASSES + 1

  def count(mask, label):
    counted = mask != 255
    return np.histogram2d(mask[counted], label[counted], bins=num_labels,
                          range=((0, num_labels), (0, num_labels)))[0].astype(np.int64)

  sweep = np.zeros((3, num_labels, num_labels), np.int64)
  paper = np.zeros((num_labels, num_labels), np.int64)
  for image, mask, tags in crops:
    seeds = reference(image, variables, SCALES, True)["cams"] * tags
    for t, threshold in enumerate((0.2, 0.4, 0.6)):
      sweep[t] += count(mask, np.argmax(
          np.concatenate([np.full(mask.shape + (1,), threshold), seeds], -1), -1))
    background = (1 - seeds.max(axis=-1, keepdims=True)) ** config.inference.bg_gamma
    paper += count(mask, np.argmax(np.concatenate([background, seeds], -1), -1))
  assert len({int(c.trace()) for c in sweep}) > 1  # the thresholds give different labels
  np.testing.assert_array_equal(counts["seeds"], sweep)
  np.testing.assert_array_equal(counts["paper"], paper)
  assert paper[:, 1:].sum() > 0  # the CAMs beat the background somewhere


def test_confident_labels_and_walk_seeds_of_a_cam_only_network_are_its_a5_cams(tmp_path):
  """`export.single_stage_seeds` are the tagged A.5 `hr_cam`; the "confident" protocol
  thresholds them (CRF off) as IRNet's cam_to_ir_label; the random walk's seeds are the tagged
  A.5 stride-4 `cam`, each class over its max + 1e-5."""
  config = paper_config()
  config.affinity.crf = False
  batch, crops = test_random_walk_export.records()
  variables = test_inference.stub_variables()
  images, tags = [image for image, _ in crops], [image_tags for _, image_tags in crops]
  seeds = export.single_stage_seeds(cam_net(), variables, images, tags, config.inference)
  walk = random_walk_export.walk_seeds(cam_net(), variables, images, tags, config.inference)
  out_dir = epath.Path(tmp_path)
  assert export.write_confident_labels(cam_net(), variables, config, [batch], out_dir) == (3, 0)
  unsure = 0
  for image_id, image, image_tags, image_seeds, walk_seeds in zip("abc", images, tags, seeds,
                                                                  walk):
    ref = reference(image, variables, SCALES, True)
    want_walk = ref["rw"] * image_tags
    np.testing.assert_allclose(walk_seeds, want_walk / (want_walk.max(axis=(0, 1)) + 1e-5),
                               atol=2e-5)
    want = ref["cams"] * image_tags
    np.testing.assert_allclose(image_seeds, want, atol=2e-5)
    fg = test_random_walk_export.argmax_with_background(0.30, want)
    bg = test_random_walk_export.argmax_with_background(0.05, want)
    label = test_random_walk_export.read_png(out_dir / f"{image_id}.png")
    clear = np.abs(np.sort(want, axis=-1)[..., -1:] - [0.30, 0.05]).min(axis=-1) > 1e-4
    want_label = np.where(fg > 0, fg, np.where(bg == 0, 0, 255))
    np.testing.assert_array_equal(label[clear], want_label[clear])
    unsure += np.sum(label == 255)
  assert unsure > 0


def test_every_mode_takes_a_cam_only_network_but_the_single_export():
  config = demo.get_config("smoke")
  config.model.with_decoder = False
  for mode in ("train", "eval", "predict"):
    config_check.check_mode(config, mode)
  for protocol in ("paper", "confident"):
    config.export.protocol = protocol
    config_check.check_mode(config, "export")
  config.export.protocol = "single"
  with pytest.raises(config_check.ConfigError,
                     match=r"CAM-only network \(config.model.with_decoder=False\) needs "
                     r"--config.export.protocol=paper or confident"):
    config_check.check_mode(config, "export")
