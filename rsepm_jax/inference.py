"""Multi-scale + flip inference of the single-stage network on one image of any size (spec 8.1).

`multiscale` runs the image at each scale, `int(h*s) x int(w*s)` (bilinear, half-pixel), with its
horizontal flip in the same batch of 2: one jitted call per view shape. Per view, the stride-4
decoder logits are nearest-resized (PyTorch's legacy floor mapping) to the view's size,
softmaxed, nearest-resized to the image's size and un-flipped; both nearest resizes and the
un-flip are one composed gather, and softmax commutes with it. The probabilities and
`sigmoid(cls_logits)` are averaged over the views. `segment` then gates the classes and adds the
background (spec 8.1 steps 2, 3 and 5).

`size_bucket > 0` pads each view (zeros after normalisation) and the output grid up to multiples
of it, so images of nearby sizes share a compilation; the resizes and the classification mean
still see only the view, but the padding changes the network's border outputs and the ASPP
image pooling a little. `size_bucket = 0` runs every view at its exact size, as the official code.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rsepm_jax import image_ops
from rsepm_jax.models import rsepm

# config.inference.background: "power" = (1 - max_c seed_c) ** bg_gamma, "constant" = bg_threshold.
BACKGROUNDS = ("power", "constant")

SCALES = (1.0, 0.5, 1.5, 2.0)
SEG_STRIDE = 4  # the decoder's logits: stride 4 (spec 1.3)


def _grid(size, stride):
  """Cells of a stride-`stride` grid over `size` pixels (every conv pads k // 2: ceil)."""
  return -(-size // stride)


def _bucket(size, bucket):
  return _grid(size, bucket) * bucket if bucket else size


@functools.lru_cache(maxsize=4096)
def _nearest_source(in_size, out_size):
  """int32 `[out_size]`: source index of each output pixel of `image_ops.resize_nearest`."""
  index = image_ops.resize_nearest(np.arange(in_size, dtype=np.int32).reshape(1, in_size, 1),
                                   (out_size, 1))
  return np.asarray(index).reshape(out_size)


def _composed_source(grid, view, out, padded_out):
  """Grid index of each output pixel after nearest grid -> view -> out, zero-padded to
  `padded_out`."""
  index = np.zeros(padded_out, np.int32)
  index[:out] = _nearest_source(grid, view)[_nearest_source(view, out)]
  return index


@functools.partial(jax.jit, static_argnums=0)
def _view_sums(model, variables, views, seg_rows, seg_cols, cam_rows, cam_cols, cam_valid):
  """Sums over the views `[V, h, w, 3]` (normalised, padded) of
  (softmax probabilities `[H, W, C + 1]`, relu CAMs `[H, W, C]`, `sigmoid(cls_logits)` `[C]`)
  on the padded output grid; `*_cols [V, W]` carry each view's un-flip."""
  outputs = model.apply(variables, views, train=False)
  seg_logits, cams = outputs["seg_logits"], outputs["cams"]
  cam_stride = rsepm.cam_stride(model.output_stride, model.last_stride)
  expected = [tuple(_grid(n, s) for n in views.shape[1:3]) for s in (SEG_STRIDE, cam_stride)]
  if [seg_logits.shape[1:3], cams.shape[1:3]] != expected:
    raise ValueError(f"Views of {views.shape[1:3]} gave seg_logits {seg_logits.shape[1:3]} and "
                     f"CAMs {cams.shape[1:3]}; inference expects grids {expected} (ceil).")

  def gather(maps, rows, cols):  # [V, h, w, K] -> [H, W, K] summed over the views
    return jnp.sum(jax.vmap(lambda m, c: m[rows][:, c])(maps, cols), axis=0)

  probs = gather(jax.nn.softmax(seg_logits, axis=-1), seg_rows, seg_cols)
  heat = gather(jax.nn.relu(cams), cam_rows, cam_cols)
  valid = cam_valid[None, :, :, None]
  cls_logits = jnp.sum(cams * valid, axis=(1, 2)) / jnp.sum(valid)
  return probs, heat, jnp.sum(jax.nn.sigmoid(cls_logits), axis=0)


def multiscale(model, variables, image, scales=SCALES, hflip=True, size_bucket=0):
  """Averages the single-stage network over scales and flips (spec 8.1 step 1).

  model, variables: an `RSEPMNet` with its decoder and its evaluation variables.
  image: uint8 RGB `[H, W, 3]`, any size.
  Returns numpy arrays:
    pred_class: `[C]`, the mean over views of `sigmoid(cls_logits)`;
    pred_mask: `[H, W, C + 1]`, the mean softmax of the decoder (background first);
    cams: `[H, W, C]`, the mean relu CAM, nearest-resized like the logits, each class divided
      by its maximum (+1e-5).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"multiscale expects a uint8 RGB image [H, W, 3], got {image.dtype} "
                     f"{list(image.shape)}.")
  if not model.with_decoder:
    raise ValueError("Multi-scale inference needs the decoder (config.model.with_decoder=True).")
  height, width = image.shape[:2]
  out_h, out_w = _bucket(height, size_bucket), _bucket(width, size_bucket)
  cam_stride = rsepm.cam_stride(model.output_stride, model.last_stride)
  normalized = image_ops.normalize(jnp.asarray(image)[None])
  totals, num_views = None, 0
  for scale in scales:
    h, w = int(height * scale), int(width * scale)
    if min(h, w) < 1:
      raise ValueError(f"Scale {scale} turns the {height}x{width} image into {h}x{w} pixels.")
    view = image_ops.resize_bilinear(normalized, (h, w))
    if hflip:
      view = jnp.concatenate([view, view[:, :, ::-1]])
    padded_h, padded_w = _bucket(h, size_bucket), _bucket(w, size_bucket)
    view = jnp.pad(view, ((0, 0), (0, padded_h - h), (0, padded_w - w), (0, 0)))

    def sources(stride):
      rows = _composed_source(_grid(h, stride), h, height, out_h)
      cols = _composed_source(_grid(w, stride), w, width, out_w)
      flipped = cols.copy()
      flipped[:width] = cols[:width][::-1]  # column d of the un-flipped map is W-1-d of the flipped
      return rows, np.stack([cols, flipped][:view.shape[0]])

    cam_valid = np.zeros((_grid(padded_h, cam_stride), _grid(padded_w, cam_stride)), bool)
    cam_valid[:_grid(h, cam_stride), :_grid(w, cam_stride)] = True
    sums = _view_sums(model, variables, view, *sources(SEG_STRIDE), *sources(cam_stride), cam_valid)
    totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
    num_views += view.shape[0]
  probs, heat, scores = (np.asarray(total, np.float32) / num_views for total in totals)
  heat = heat[:height, :width]
  return {"pred_class": scores, "pred_mask": probs[:height, :width],
          "cams": heat / (heat.max(axis=(0, 1)) + 1e-5)}


def segment(pred_mask, pred_class, tags=None, conf_th=0.34, bg_gamma=2.0, bg_threshold=None):
  """Class gating and background (spec 8.1 steps 2, 3 and 5) on `multiscale`'s outputs.

  Classes kept: `tags` (multi-hot `[C]`) when given, else `pred_class >= conf_th`. Each decoder
  foreground channel of `pred_mask [H, W, C + 1]` is divided by its own maximum (+1e-5) and the
  others are zeroed; the decoder's background is replaced by `(1 - max_c seed_c) ** bg_gamma`,
  or by the constant `bg_threshold` when given.
  Returns keys: int `[K]` kept classes (0-based), probs: `[H, W, C + 1]` background then seeds
  (the CRF's input), label: uint8 `[H, W]` argmax (0 background, c + 1 class c; all 0 when no
  class is kept).
  """
  keep = np.asarray(tags, bool) if tags is not None else np.asarray(pred_class) >= conf_th
  foreground = np.asarray(pred_mask, np.float32)[..., 1:]
  seeds = foreground / (foreground.max(axis=(0, 1)) + 1e-5) * keep
  if bg_threshold is None:
    background = (1.0 - seeds.max(axis=-1)) ** bg_gamma
  else:
    background = np.full(seeds.shape[:2], bg_threshold, np.float32)
  probs = np.concatenate([background[..., None], seeds], axis=-1)
  label = np.argmax(probs, axis=-1).astype(np.uint8) if keep.any() else np.zeros(
      seeds.shape[:2], np.uint8)
  return {"keys": np.flatnonzero(keep), "probs": probs, "label": label}
