"""Multi-scale + flip inference on images of any size (spec 8.1; spec 9 for stage-2 networks).

`multiscale` runs the image at each scale, `int(h*s) x int(w*s)` (bilinear, half-pixel), with its
horizontal flip in the same batch. Single-stage network (spec 8.1): per view, the stride-4
decoder logits are nearest-resized (PyTorch's legacy floor mapping) to the view's size,
softmaxed, nearest-resized to the image's size and un-flipped; both nearest resizes and the
un-flip are one composed gather, and softmax commutes with it. The probabilities and
`sigmoid(cls_logits)` are averaged over the views. Stage-2 networks (DeepLab, spec 9): per view,
the logits are bilinearly resized straight to the image's size (two interpolation matrices, the
un-flip folded in); the views' logits are summed and softmaxed (Puzzle-CAM's rule; or their
softmaxes averaged: `stage2_merge`). `segment_scores` then gates the classes and adds the
background (spec 8.1 steps 2, 3 and 5; stage 2: the softmax as is).

`multiscale_many` runs images of one size (one set of view shapes) together, `max_batch` per
device call: one compilation per view shape and batch size.
`size_bucket > 0` pads each view (zeros after normalisation) and the output grid up to multiples
of it, so images of nearby sizes share a compilation and a call; the resizes and the
classification mean still see only the view, but the padding changes the network's border
outputs and the ASPP image pooling a little. `size_bucket = 0` runs every view at its exact size,
as the official code.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rsepm_jax import image_ops
from rsepm_jax.models import rsepm

# config.inference.background: "power" = (1 - max_c seed_c) ** bg_gamma, "constant" = bg_threshold.
BACKGROUNDS = ("power", "constant")
# config.inference.stage2_merge: how a stage-2 network's views combine: "sum_logits" = softmax of
# the summed logits (Puzzle-CAM's segmentation inference), "mean_softmax" = mean of the softmaxes.
STAGE2_MERGES = ("sum_logits", "mean_softmax")

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


def _check_grid(got, views_shape, stride, what):
  expected = tuple(_grid(n, stride) for n in views_shape)
  if tuple(got) != expected:
    raise ValueError(f"Views of {tuple(views_shape)} gave {what} {tuple(got)}; inference expects "
                     f"the grid {expected} (ceil).")


def _apply_views(model, variables, views):
  """The network on views `[N, V, h, w, 3]`; outputs reshaped to `[N, V, ...]`."""
  n, v = views.shape[:2]
  outputs = model.apply(variables, views.reshape((n * v,) + views.shape[2:]), train=False)
  return {key: outputs[key].reshape((n, v) + outputs[key].shape[1:])
          for key in ("seg_logits", "cams") if key in outputs}


@functools.partial(jax.jit, static_argnums=0)
def _single_stage_sums(model, variables, views, seg_rows, seg_cols, cam_rows, cam_cols, cam_valid):
  """Per image, sums over its views `views [N, V, h, w, 3]` (normalised, padded) of
  (softmax probabilities `[N, H, W, C + 1]`, relu CAMs `[N, H, W, C]`, `sigmoid(cls_logits)`
  `[N, C]`) on the padded output grid; `*_rows [N, H]`, `*_cols [N, V, W]` are each image's
  nearest sources, the un-flip folded into the columns; `cam_valid [N, h/s, w/s]`."""
  outputs = _apply_views(model, variables, views)
  seg_logits, cams = outputs["seg_logits"], outputs["cams"]
  cam_stride = rsepm.cam_stride(model.output_stride, model.last_stride)
  _check_grid(seg_logits.shape[2:4], views.shape[2:4], SEG_STRIDE, "seg_logits")
  _check_grid(cams.shape[2:4], views.shape[2:4], cam_stride, "CAMs")

  def gather(maps, rows, cols):  # [V, h, w, K] -> [H, W, K] summed over the views
    return jnp.sum(jax.vmap(lambda m, c: m[rows][:, c])(maps, cols), axis=0)

  probs = jax.vmap(gather)(jax.nn.softmax(seg_logits, axis=-1), seg_rows, seg_cols)
  heat = jax.vmap(gather)(jax.nn.relu(cams), cam_rows, cam_cols)
  valid = cam_valid[:, None, :, :, None]
  cls_logits = jnp.sum(cams * valid, axis=(2, 3)) / jnp.sum(valid, axis=(2, 3))
  return probs, heat, jnp.sum(jax.nn.sigmoid(cls_logits), axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _stage2_sums(model, variables, views, row_weights, col_weights):
  """Per image, sums over its views `[N, V, h, w, 3]` of (the softmax, the logits) `[N, H, W,
  C + 1]` of the logits bilinearly resized to the image: `row_weights [N, H, gh]`, `col_weights
  [N, V, W, gw]` (the un-flip folded in) are the interpolation matrices."""
  logits = _apply_views(model, variables, views)["seg_logits"]
  logits = jnp.einsum("nhy,nvyxk->nvhxk", row_weights, logits)
  logits = jnp.einsum("nvhxk,nvwx->nvhwk", logits, col_weights)
  return jnp.sum(jax.nn.softmax(logits, axis=-1), axis=1), jnp.sum(logits, axis=1)


_STRIDES = {}  # model -> stride of its seg_logits, or None for the single-stage network


def stage2_stride(model, variables):
  """None for the single-stage network (its outputs hold CAMs: spec 8.1's rule), else the
  stride of a stage-2 network's logits (spec 9's rule), probed once per model."""
  if model not in _STRIDES:
    probe = 64
    shapes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                            jax.ShapeDtypeStruct((1, probe, probe, 3), jnp.float32))
    if "seg_logits" not in shapes:
      raise ValueError("Multi-scale inference needs the decoder (config.model.with_decoder=True).")
    _STRIDES[model] = None if "cams" in shapes else probe // shapes["seg_logits"].shape[1]
  return _STRIDES[model]


def _bilinear_matrix(in_size, out_size, padded_in, padded_out):
  """`[padded_out, padded_in]` weights of `image_ops.resize_bilinear` from `in_size` to
  `out_size` pixels (half-pixel, no antialias), zero outside."""
  eye = np.eye(in_size, dtype=np.float32)[None, :, :, None]
  weights = np.zeros((padded_out, padded_in), np.float32)
  weights[:out_size, :in_size] = np.asarray(
      image_ops.resize_bilinear(eye, (out_size, in_size)))[0, :, :, 0]
  return weights


def _view_sizes(height, width, scales):
  sizes = [(int(height * s), int(width * s)) for s in scales]
  for scale, (h, w) in zip(scales, sizes):
    if min(h, w) < 1:
      raise ValueError(f"Scale {scale} turns the {height}x{width} image into {h}x{w} pixels.")
  return sizes


def _group_key(shape, scales, size_bucket):
  """Images with one key run in one device call: same padded views and output grid."""
  sizes = _view_sizes(shape[0], shape[1], scales)
  return tuple((_bucket(h, size_bucket), _bucket(w, size_bucket)) for h, w in sizes) + (
      (_bucket(shape[0], size_bucket), _bucket(shape[1], size_bucket)),)


def _check_image(image):
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"multiscale expects a uint8 RGB image [H, W, 3], got {image.dtype} "
                     f"{list(image.shape)}.")
  return image


def _run_group(model, variables, images, scales, hflip, size_bucket, stage2_merge):
  """`multiscale` of images sharing one `_group_key`: one device call per scale."""
  stride = stage2_stride(model, variables)
  shapes = [image.shape[:2] for image in images]
  out_h, out_w = _group_key(shapes[0], scales, size_bucket)[-1]
  num_flips = 2 if hflip else 1
  totals = None
  for index, _ in enumerate(scales):
    sizes = [_view_sizes(h, w, scales)[index] for h, w in shapes]
    padded_h, padded_w = _bucket(sizes[0][0], size_bucket), _bucket(sizes[0][1], size_bucket)
    views = []
    for image, (h, w) in zip(images, sizes):
      view = image_ops.resize_bilinear(image_ops.normalize(jnp.asarray(image)[None]), (h, w))
      view = jnp.concatenate([view, view[:, :, ::-1]]) if hflip else view
      views.append(jnp.pad(view, ((0, 0), (0, padded_h - h), (0, padded_w - w), (0, 0))))
    views = jnp.stack(views)

    def with_flip(cols, width):  # [W', ...] -> [V, W', ...]: column d un-flipped is W-1-d
      flipped = cols.copy()
      flipped[:width] = cols[:width][::-1]
      return np.stack([cols, flipped][:num_flips])

    if stride is None:
      def sources(grid_stride):
        rows = np.stack([_composed_source(_grid(h, grid_stride), h, height, out_h)
                         for (h, _), (height, _) in zip(sizes, shapes)])
        cols = np.stack([with_flip(_composed_source(_grid(w, grid_stride), w, width, out_w), width)
                         for (_, w), (_, width) in zip(sizes, shapes)])
        return rows, cols

      cam_stride = rsepm.cam_stride(model.output_stride, model.last_stride)
      cam_valid = np.zeros((len(images), _grid(padded_h, cam_stride), _grid(padded_w, cam_stride)),
                           bool)
      for valid, (h, w) in zip(cam_valid, sizes):
        valid[:_grid(h, cam_stride), :_grid(w, cam_stride)] = True
      sums = _single_stage_sums(model, variables, views, *sources(SEG_STRIDE),
                                *sources(cam_stride), cam_valid)
    else:
      rows = np.stack([_bilinear_matrix(_grid(h, stride), height, _grid(padded_h, stride), out_h)
                       for (h, _), (height, _) in zip(sizes, shapes)])
      cols = np.stack([with_flip(_bilinear_matrix(_grid(w, stride), width,
                                                  _grid(padded_w, stride), out_w), width)
                       for (_, w), (_, width) in zip(sizes, shapes)])
      sums = _stage2_sums(model, variables, views, rows, cols)
    totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
  num_views = num_flips * len(scales)
  results = []
  for i, (height, width) in enumerate(shapes):
    probs = np.asarray(totals[0][i], np.float32)[:height, :width] / num_views
    if stride is not None and stage2_merge == "sum_logits":
      logits = np.asarray(totals[1][i], np.float32)[:height, :width]
      probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
      probs /= probs.sum(axis=-1, keepdims=True)
    if stride is None:
      heat = np.asarray(totals[1][i], np.float32)[:height, :width] / num_views
      pred_class = np.asarray(totals[2][i], np.float32) / num_views
    else:
      heat = probs[..., 1:]
      pred_class = heat.max(axis=(0, 1))
    results.append({"pred_class": pred_class, "pred_mask": probs,
                    "cams": heat / (heat.max(axis=(0, 1)) + 1e-5), "stage2": stride is not None})
  return results


def multiscale_many(model, variables, images, scales=SCALES, hflip=True, size_bucket=0,
                    max_batch=4, stage2_merge="sum_logits"):
  """`multiscale` of each of `images` (uint8 RGB `[H_i, W_i, 3]`, any sizes), in their order.
  Images whose views share shapes (the same size, or with `size_bucket` the same buckets) run
  together, up to `max_batch` images per device call. `stage2_merge`: one of STAGE2_MERGES."""
  if stage2_merge not in STAGE2_MERGES:
    raise ValueError(f"stage2_merge={stage2_merge!r}; expected one of {STAGE2_MERGES}.")
  images = [_check_image(image) for image in images]
  groups = {}
  for index, image in enumerate(images):
    groups.setdefault(_group_key(image.shape, scales, size_bucket), []).append(index)
  results = [None] * len(images)
  for indices in groups.values():
    for start in range(0, len(indices), max_batch):
      chunk = indices[start:start + max_batch]
      for index, result in zip(chunk, _run_group(model, variables, [images[i] for i in chunk],
                                                 scales, hflip, size_bucket, stage2_merge)):
        results[index] = result
  return results


def multiscale(model, variables, image, scales=SCALES, hflip=True, size_bucket=0,
               stage2_merge="sum_logits"):
  """Averages a network over scales and flips (spec 8.1 step 1; spec 9 for stage-2 networks).

  model, variables: the single-stage `RSEPMNet` (with its decoder) or a stage-2 network (its
    outputs have no "cams"), with evaluation variables.
  image: uint8 RGB `[H, W, 3]`, any size.
  Returns numpy arrays:
    pred_mask: `[H, W, C + 1]`, the mean softmax (background first); stage 2: per
      `stage2_merge`, by default the softmax of the summed logits;
    pred_class: `[C]`, the mean over views of `sigmoid(cls_logits)`; stage 2: the maximum of
      each class's probability over the image;
    cams: `[H, W, C]`, the mean relu CAM, nearest-resized like the logits, each class divided
      by its maximum (+1e-5); stage 2: the class probabilities so normalised;
  and `stage2`: whether the stage-2 rule was used.
  """
  return multiscale_many(model, variables, [image], scales, hflip, size_bucket,
                         stage2_merge=stage2_merge)[0]


def multiscale_config(model, variables, images, settings):
  """`multiscale_many` with the knobs of `config.inference` (`settings`)."""
  return multiscale_many(model, variables, images, tuple(settings.scales), settings.hflip,
                         settings.size_bucket, settings.max_batch, settings.stage2_merge)


def segment(pred_mask, pred_class, tags=None, conf_th=0.34, bg_gamma=2.0, bg_threshold=None,
            softmax_as_is=False):
  """Class gating and background (spec 8.1 steps 2, 3 and 5; spec 9) on `multiscale`'s outputs.

  Classes kept: `tags` (multi-hot `[C]`) when given, else `pred_class >= conf_th`. Each decoder
  foreground channel of `pred_mask [H, W, C + 1]` is divided by its own maximum (+1e-5) and the
  others are zeroed; the decoder's background is replaced by `(1 - max_c seed_c) ** bg_gamma`,
  or by the constant `bg_threshold` when given. `softmax_as_is` (stage-2 networks): the
  probabilities are kept as they are, background included; only the gating applies.
  Returns keys: int `[K]` kept classes (0-based), probs: `[H, W, C + 1]` background then seeds
  (the CRF's input), label: uint8 `[H, W]` argmax (0 background, c + 1 class c; all 0 when no
  class is kept).
  """
  keep = np.asarray(tags, bool) if tags is not None else np.asarray(pred_class) >= conf_th
  pred_mask = np.asarray(pred_mask, np.float32)
  foreground = pred_mask[..., 1:]
  if softmax_as_is:
    seeds, background = foreground * keep, pred_mask[..., 0]
  else:
    seeds = foreground / (foreground.max(axis=(0, 1)) + 1e-5) * keep
    if bg_threshold is None:
      background = (1.0 - seeds.max(axis=-1)) ** bg_gamma
    else:
      background = np.full(seeds.shape[:2], bg_threshold, np.float32)
  probs = np.concatenate([background[..., None], seeds], axis=-1)
  label = np.argmax(probs, axis=-1).astype(np.uint8) if keep.any() else np.zeros(
      seeds.shape[:2], np.uint8)
  return {"keys": np.flatnonzero(keep), "probs": probs, "label": label}


def segment_scores(scores, settings, tags=None):
  """`segment` of `multiscale` outputs by the rule of their network and `config.inference`
  (`settings`): stage 2 gates by `stage2_class_th` and keeps the softmax as is."""
  if scores["stage2"]:
    return segment(scores["pred_mask"], scores["pred_class"], tags,
                   conf_th=settings.stage2_class_th, softmax_as_is=True)
  constant = settings.background == "constant"
  return segment(scores["pred_mask"], scores["pred_class"], tags, conf_th=settings.conf_th,
                 bg_gamma=settings.bg_gamma, bg_threshold=settings.bg_threshold if constant else None)
