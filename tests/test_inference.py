"""Multi-scale + flip inference (spec 8.1) against a NumPy loop over the views on a stub network."""
import cv2
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax import inference

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255
NUM_CLASSES = 3
CAM_STRIDE = 8


class StubNet(nn.Module):
  """Logits that depend only on pixels and their column: the seg logits at cell (i, j) are
  `x[4i, 4j] @ seg + 0.3 * j * ramp` (stride 4, ceil grid; none with `with_decoder=False`), the
  CAMs `x[8i, 8j] @ cam`."""
  output_stride: int = CAM_STRIDE
  last_stride: int = 1
  with_decoder: bool = True

  @nn.compact
  def __call__(self, images, train=False):
    seg = self.param("seg", nn.initializers.zeros, (3, NUM_CLASSES + 1))
    ramp = self.param("ramp", nn.initializers.zeros, (NUM_CLASSES + 1,))
    cam = self.param("cam", nn.initializers.zeros, (3, NUM_CLASSES))
    cells = images[:, ::4, ::4]
    columns = jnp.arange(cells.shape[2], dtype=jnp.float32)[None, None, :, None]
    cams = images[:, ::CAM_STRIDE, ::CAM_STRIDE] @ cam
    outputs = {"cams": cams, "cls_logits": cams.mean(axis=(1, 2))}
    if self.with_decoder:
      outputs["seg_logits"] = cells @ seg + 0.3 * columns * ramp
    return outputs


def stub_variables(seed=0):
  rng = np.random.RandomState(seed)
  return {"params": {"seg": rng.normal(size=(3, NUM_CLASSES + 1)).astype(np.float32),
                     "ramp": rng.normal(size=NUM_CLASSES + 1).astype(np.float32),
                     "cam": rng.normal(size=(3, NUM_CLASSES)).astype(np.float32)}}


def nearest(in_size, out_size):
  """PyTorch legacy nearest: output pixel d reads input floor(d * in / out)."""
  return [int(np.floor(d * in_size / out_size)) for d in range(out_size)]


def reference(image, variables, scales, hflip, unflip_at_view_size=False):
  """Spec 8.1 step 1 view by view, in NumPy: bilinear (OpenCV, half-pixel) view of
  int(h*s) x int(w*s), stub logits, nearest to the view, softmax, nearest to the image, un-flip
  (`unflip_at_view_size`: un-flip before the resize to the image instead)."""
  p = variables["params"]
  height, width = image.shape[:2]
  x = ((image - MEAN) / STD).astype(np.float32)
  probs, cams, scores = 0.0, 0.0, []
  for scale in scales:
    h, w = int(height * scale), int(width * scale)
    view = cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR)
    for flip in (False, True)[:1 + hflip]:
      v = view[:, ::-1] if flip else view
      cells = v[::4, ::4]
      logits = cells @ p["seg"] + 0.3 * np.arange(cells.shape[1])[None, :, None] * p["ramp"]
      logits = logits[nearest(logits.shape[0], h)][:, nearest(logits.shape[1], w)]
      soft = np.exp(logits - logits.max(-1, keepdims=True))
      soft /= soft.sum(-1, keepdims=True)
      if flip and unflip_at_view_size:
        soft, flip = soft[:, ::-1], False
      soft = soft[nearest(h, height)][:, nearest(w, width)]
      cam = v[::CAM_STRIDE, ::CAM_STRIDE] @ p["cam"]
      scores.append(1 / (1 + np.exp(-cam.mean(axis=(0, 1)))))
      heat = np.maximum(cam, 0)[nearest(cam.shape[0], h)][:, nearest(cam.shape[1], w)]
      heat = heat[nearest(h, height)][:, nearest(w, width)]
      probs = probs + (soft[:, ::-1] if flip else soft)
      cams = cams + (heat[:, ::-1] if flip else heat)
  n = len(scores)
  cams = cams / n
  return {"pred_class": np.mean(scores, axis=0), "pred_mask": probs / n,
          "cams": cams / (cams.max(axis=(0, 1)) + 1e-5)}


@pytest.mark.parametrize("size, scales, hflip, bucket", [
    ((37, 23), (1.0, 0.5, 1.5, 2.0), True, 0),  # odd sizes: int(18.5) = 18, int(55.5) = 55 ...
    ((37, 23), (1.0, 0.5, 1.5, 2.0), True, 32),  # padded views: the stub is local, so no change
    ((20, 30), (1.0, 0.7), False, 0),
])
def test_multiscale_matches_a_numpy_loop_over_the_views(size, scales, hflip, bucket):
  image = np.random.RandomState(1).randint(0, 256, size + (3,)).astype(np.uint8)
  variables = stub_variables()
  got = inference.multiscale(StubNet(), variables, image, scales, hflip, size_bucket=bucket)
  want = reference(image, variables, scales, hflip)
  for key in ("pred_class", "pred_mask", "cams"):
    assert got[key].shape == want[key].shape, key
    np.testing.assert_allclose(got[key], want[key], atol=2e-5, err_msg=key)


def test_flip_is_undone_after_the_resize_to_the_image():
  """Nearest resizing is not flip-symmetric: un-flipping at the view's size gives other maps."""
  image = np.random.RandomState(2).randint(0, 256, (37, 23, 3)).astype(np.uint8)
  variables = stub_variables(3)
  got = inference.multiscale(StubNet(), variables, image, (1.5,), True)["pred_mask"]
  np.testing.assert_allclose(got, reference(image, variables, (1.5,), True)["pred_mask"], atol=2e-5)
  early = reference(image, variables, (1.5,), True, unflip_at_view_size=True)["pred_mask"]
  assert np.abs(got - early).max() > 1e-3


def test_segment_gates_classes_and_adds_the_background_by_hand():
  mask = np.zeros((1, 3, 4), np.float32)  # 3 pixels, background + 3 classes
  mask[0, :, 1] = [0.8, 0.4, 0.1]  # class 0: max 0.8 -> seeds 1, 0.5, 0.125
  mask[0, :, 2] = [0.1, 0.2, 0.05]  # class 1: max 0.2 -> 0.5, 1, 0.25
  mask[0, :, 3] = [0.9, 0.9, 0.9]  # class 2: gated off below
  scores = np.array([0.9, 0.34, 0.2])
  out = inference.segment(mask, scores, conf_th=0.34, bg_gamma=2.0)
  np.testing.assert_array_equal(out["keys"], [0, 1])
  seeds = np.array([[1, 0.5, 0.125], [0.5, 1, 0.25], [0, 0, 0]]).T
  seeds /= 1 + 1e-5 / np.array([0.8, 0.2, 1])  # the +1e-5 of the per-class maximum
  # max seed per pixel ~ 1, 1, 0.25 -> background (1 - m)^2 ~ 0, 0, 0.5625
  np.testing.assert_allclose(out["probs"][0, :, 1:], seeds, atol=1e-6)
  np.testing.assert_allclose(out["probs"][0, :, 0], [0, 0, 0.5625], atol=1e-4)
  np.testing.assert_array_equal(out["label"][0], [1, 2, 0])

  constant = inference.segment(mask, scores, conf_th=0.34, bg_threshold=0.2)
  np.testing.assert_array_equal(constant["label"][0], [1, 2, 2])  # 0.25 > 0.2 for class 1

  tagged = inference.segment(mask, scores, tags=np.array([0, 0, 1]))  # tags override the scores
  np.testing.assert_array_equal(tagged["keys"], [2])
  np.testing.assert_array_equal(tagged["label"][0], [3, 3, 3])

  none = inference.segment(mask, scores, conf_th=0.95, bg_threshold=0.0)
  assert none["keys"].size == 0 and not none["label"].any()  # no class: all background


def test_multiscale_names_a_bad_image_or_scale():
  with pytest.raises(ValueError, match=r"uint8 RGB image \[H, W, 3\], got float32 \[4, 4\]"):
    inference.multiscale(StubNet(), stub_variables(), np.zeros((4, 4), np.float32))
  with pytest.raises(ValueError, match="Scale 0.1 turns the 5x5 image into 0x0"):
    inference.multiscale(StubNet(), stub_variables(), np.zeros((5, 5, 3), np.uint8), (0.1,))


class Stage2StubNet(nn.Module):
  """A stage-2 network's outputs: logits at stride 8, `x[8i, 8j] @ seg + 0.3 * j * ramp`."""

  @nn.compact
  def __call__(self, images, train=False):
    seg = self.param("seg", nn.initializers.zeros, (3, NUM_CLASSES + 1))
    ramp = self.param("ramp", nn.initializers.zeros, (NUM_CLASSES + 1,))
    cells = images[:, ::8, ::8]
    columns = jnp.arange(cells.shape[2], dtype=jnp.float32)[None, None, :, None]
    return {"seg_logits": cells @ seg + 0.3 * columns * ramp}


def softmax(logits):
  soft = np.exp(logits - logits.max(-1, keepdims=True))
  return soft / soft.sum(-1, keepdims=True)


def stage2_reference(image, variables, scales, hflip, merge):
  """Spec 9 view by view: the logits bilinearly resized (OpenCV, half-pixel) to the image,
  un-flipped; "sum_logits": summed, then softmaxed; "mean_softmax": softmaxed, then averaged;
  class scores = the maximum probability of each class."""
  p = variables["params"]
  height, width = image.shape[:2]
  x = ((image - MEAN) / STD).astype(np.float32)
  probs, summed, n = 0.0, 0.0, 0
  for scale in scales:
    h, w = int(height * scale), int(width * scale)
    view = cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR)
    for flip in (False, True)[:1 + hflip]:
      cells = (view[:, ::-1] if flip else view)[::8, ::8]
      logits = cells @ p["seg"] + 0.3 * np.arange(cells.shape[1])[None, :, None] * p["ramp"]
      logits = cv2.resize(logits.astype(np.float32), (width, height),
                          interpolation=cv2.INTER_LINEAR)
      logits = logits[:, ::-1] if flip else logits
      probs, summed, n = probs + softmax(logits), summed + logits, n + 1
  probs = softmax(summed) if merge == "sum_logits" else probs / n
  return {"pred_mask": probs, "pred_class": probs[..., 1:].max(axis=(0, 1))}


@pytest.mark.parametrize("merge", inference.STAGE2_MERGES)
def test_stage2_networks_use_bilinear_logits(merge):
  image = np.random.RandomState(4).randint(0, 256, (45, 29, 3)).astype(np.uint8)
  variables = stub_variables(5)
  variables = {"params": {k: variables["params"][k] for k in ("seg", "ramp")}}
  got = inference.multiscale(Stage2StubNet(), variables, image, (1.0, 0.5, 1.5), True,
                             stage2_merge=merge)
  want = stage2_reference(image, variables, (1.0, 0.5, 1.5), True, merge)
  other = stage2_reference(image, variables, (1.0, 0.5, 1.5), True,
                           ({*inference.STAGE2_MERGES} - {merge}).pop())
  assert got["rule"] == "stage2" and np.abs(want["pred_mask"] - other["pred_mask"]).max() > 1e-2
  for key in ("pred_mask", "pred_class"):
    np.testing.assert_allclose(got[key], want[key], atol=2e-5, err_msg=key)


def test_several_images_per_call_give_each_image_its_own_result():
  """3 images of one size (2 calls at max_batch=2), one of another, and with buckets two sizes
  sharing calls: each equals the NumPy loop on that image alone."""
  rng = np.random.RandomState(6)
  sizes = [(37, 23), (20, 30), (37, 23), (37, 23), (35, 22)]
  images = [rng.randint(0, 256, size + (3,)).astype(np.uint8) for size in sizes]
  variables = stub_variables(7)
  for bucket in (0, 32):
    got = inference.multiscale_many(StubNet(), variables, images, (1.0, 0.5), True, bucket,
                                    max_batch=2)
    for image, result in zip(images, got):
      want = reference(image, variables, (1.0, 0.5), True)
      for key in ("pred_class", "pred_mask", "cams"):
        np.testing.assert_allclose(result[key], want[key], atol=2e-5, err_msg=key)


def test_segment_keeps_a_stage2_softmax_and_gates_its_classes():
  mask = np.array([[[0.5, 0.3, 0.15, 0.05], [0.1, 0.1, 0.1, 0.7]]], np.float32)  # 2 pixels
  out = inference.segment(mask, np.array([0.3, 0.15, 0.7]), conf_th=0.2, softmax_as_is=True)
  np.testing.assert_array_equal(out["keys"], [0, 2])
  np.testing.assert_allclose(out["probs"][0], [[0.5, 0.3, 0, 0.05], [0.1, 0.1, 0, 0.7]])
  np.testing.assert_array_equal(out["label"][0], [0, 3])
