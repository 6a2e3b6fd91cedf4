"""Multi-scale + flip inference on images of any size (spec 8.1; spec 9 for stage-2 networks;
components spec A.5 for CAM-only networks).

`multiscale` runs the image at each scale, `int(h*s) x int(w*s)` (bilinear, half-pixel), with its
horizontal flip in the same batch. Single-stage network (spec 8.1): per view, the stride-4
decoder logits are nearest-resized (PyTorch's legacy floor mapping) to the view's size,
softmaxed, nearest-resized to the image's size and un-flipped; both nearest resizes and the
un-flip are one composed gather, and softmax commutes with it. The probabilities and
`sigmoid(cls_logits)` are averaged over the views. Stage-2 networks (DeepLab, spec 9): per view,
the logits are bilinearly resized straight to the image's size (two interpolation matrices, the
un-flip folded in); the views' logits are summed and softmaxed (Puzzle-CAM's rule; or their
softmaxes averaged: `stage2_merge`). CAM-only networks (`RSEPMNet` with `with_decoder=False`,
Puzzle-CAM; IRNet's `make_cam`, components spec A.5): per scale, the relu CAMs of the view and of
its flip un-flipped on the CAM grid are summed (A_s), bilinearly resized to
`stride * ceil(H / stride)` (the CAM stride) and cropped to the image, summed over the scales and
each class divided by its maximum (+1e-5) (A.5's `hr_cam`); A.5's `cam`, the random walk's seeds,
resizes each A_s straight to the stride-4 grid `ceil(H / 4) x ceil(W / 4)` instead. The official
code resizes the views with PIL bicubic
to `round(h*s)`; here every rule uses the same bilinear `int(h*s)` views. `segment_scores` then
gates the classes and adds the background (spec 8.1 steps 2, 3 and 5, also for CAM-only
networks; stage 2: the softmax as is).

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
from rsepm_jax.models import affinity
from rsepm_jax.models import rsepm

# The rule of `multiscale`'s result "rule": spec 8.1 (RS+EPM with its decoder), spec 9 (DeepLab
# networks, logits only), components spec A.5 (CAM-only networks: CAMs, no decoder).
RULES = ("single_stage", "stage2", "cam")
# config.inference.background: "power" = (1 - max_c seed_c) ** bg_gamma, "constant" = bg_threshold.
BACKGROUNDS = ("power", "constant")
# config.inference.stage2_merge: how a stage-2 network's views combine: "sum_logits" = softmax of
# the summed logits (Puzzle-CAM's segmentation inference), "mean_softmax" = mean of the softmaxes.
STAGE2_MERGES = ("sum_logits", "mean_softmax")

SCALES = (1.0, 0.5, 1.5, 2.0)
SEG_STRIDE = 4  # the decoder's logits: stride 4 (spec 1.3)
RW_STRIDE = affinity.EDGE_STRIDE  # the random walk's grid: A.5's `cam` of CAM-only networks


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


def _class_scores(cams, cam_valid):
  """`[N, C]` sums over the views of `sigmoid(cls_logits)`: the mean of the CAMs `[N, V, h, w, C]`
  over each view's valid cells `cam_valid [N, h, w]` (padding excluded)."""
  valid = cam_valid[:, None, :, :, None]
  cls_logits = jnp.sum(cams * valid, axis=(2, 3)) / jnp.sum(valid, axis=(2, 3))
  return jnp.sum(jax.nn.sigmoid(cls_logits), axis=1)


def _resize_views(maps, row_weights, col_weights):
  """Maps `[N, V, h, w, K]` resized by interpolation matrices `row_weights [N, H, h]` and
  `col_weights [N, V, W, w]` -> `[N, V, H, W, K]`."""
  maps = jnp.einsum("nhy,nvyxk->nvhxk", row_weights, maps)
  return jnp.einsum("nvhxk,nvwx->nvhwk", maps, col_weights)


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
  return probs, heat, _class_scores(cams, cam_valid)


@functools.partial(jax.jit, static_argnums=0)
def _stage2_sums(model, variables, views, row_weights, col_weights):
  """Per image, sums over its views `[N, V, h, w, 3]` of (the softmax, the logits) `[N, H, W,
  C + 1]` of the logits bilinearly resized to the image: `row_weights [N, H, gh]`, `col_weights
  [N, V, W, gw]` (the un-flip folded in) are the interpolation matrices."""
  logits = _resize_views(_apply_views(model, variables, views)["seg_logits"], row_weights,
                         col_weights)
  return jnp.sum(jax.nn.softmax(logits, axis=-1), axis=1), jnp.sum(logits, axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _cam_sums(model, stride, variables, views, rows, cols, rw_rows, rw_cols, cam_valid):
  """Per image, sums over its views `[N, V, h, w, 3]` of (the relu CAMs bilinearly resized to
  the image `[N, H, W, C]`, and to the random walk's grid `[N, H4, W4, C]`,
  `sigmoid(cls_logits)` `[N, C]`): `rows [N, H, gh]`, `cols [N, V, W, gw]` and `rw_rows`,
  `rw_cols` likewise (the un-flip on the CAM grid folded in) are the interpolation matrices,
  `cam_valid [N, gh, gw]`; `stride`: the CAM stride."""
  cams = _apply_views(model, variables, views)["cams"]
  _check_grid(cams.shape[2:4], views.shape[2:4], stride, "CAMs")
  heat = jax.nn.relu(cams)
  return (jnp.sum(_resize_views(heat, rows, cols), axis=1),
          jnp.sum(_resize_views(heat, rw_rows, rw_cols), axis=1), _class_scores(cams, cam_valid))


_RULES = {}  # model -> (one of RULES, the stride of the maps that rule resizes)


def inference_rule(model, variables):
  """(rule, stride) of a network, probed once per model: ("single_stage", CAM stride) when its
  outputs hold "seg_logits" and "cams" (spec 8.1), ("stage2", stride of its logits) with
  "seg_logits" only (spec 9), ("cam", CAM stride) with "cams" only (components spec A.5)."""
  if model not in _RULES:
    probe = 64
    shapes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                            jax.ShapeDtypeStruct((1, probe, probe, 3), jnp.float32))
    if "seg_logits" in shapes and "cams" in shapes:
      _RULES[model] = ("single_stage", rsepm.cam_stride(model.output_stride, model.last_stride))
    elif "seg_logits" in shapes:
      _RULES[model] = ("stage2", probe // shapes["seg_logits"].shape[1])
    elif "cams" in shapes:
      _RULES[model] = ("cam", probe // shapes["cams"].shape[1])
    else:
      raise ValueError("Multi-scale inference needs a network with 'seg_logits' or 'cams' "
                       f"outputs; got {sorted(shapes)}.")
  return _RULES[model]


def _bilinear_matrix(in_size, out_size, padded_in, padded_out, resized=None):
  """`[padded_out, padded_in]` weights of `image_ops.resize_bilinear` from `in_size` to
  `resized` (default `out_size`) pixels (half-pixel, no antialias), the first `out_size` kept,
  zero outside."""
  resized = resized or out_size
  eye = np.eye(in_size, dtype=np.float32)[None, :, :, None]
  weights = np.zeros((padded_out, padded_in), np.float32)
  weights[:out_size, :in_size] = np.asarray(
      image_ops.resize_bilinear(eye, (resized, in_size)))[0, :out_size, :, 0]
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


def _valid_cells(sizes, padded_h, padded_w, stride):
  """bool `[N, gh, gw]`: the CAM cells of each view of `sizes` on the padded views' grid."""
  valid = np.zeros((len(sizes), _grid(padded_h, stride), _grid(padded_w, stride)), bool)
  for cells, (h, w) in zip(valid, sizes):
    cells[:_grid(h, stride), :_grid(w, stride)] = True
  return valid


def _cam_matrices(sizes, shapes, padded_view, padded_out, stride, num_flips):
  """A.5's interpolation matrices of views of `sizes` of images of `shapes` ((h, w) lists),
  padded to `padded_view` and `padded_out`: [rows `[N, H, gh]`, cols `[N, V, W, gw]`] to
  stride * ceil(n / stride) cropped to n (`hr_cam`), then the same straight to ceil(n / RW_STRIDE)
  (`cam`); the flipped views' columns reversed on the CAM grid (IRNet un-flips there)."""
  def per_image(axis, rw):
    out = _grid(padded_out[axis], RW_STRIDE) if rw else padded_out[axis]
    return [_bilinear_matrix(_grid(view[axis], stride), _grid(n, RW_STRIDE) if rw else n,
                             _grid(padded_view[axis], stride), out,
                             resized=None if rw else _grid(n, stride) * stride)
            for view, n in zip(sizes, (shape[axis] for shape in shapes))]

  def with_grid_flip(cols, grid_width):  # [W', gw'] -> [V, W', gw']: cell x un-flipped
    flipped = cols.copy()
    flipped[:, :grid_width] = cols[:, :grid_width][:, ::-1]
    return np.stack([cols, flipped][:num_flips])

  weights = []
  for rw in (False, True):
    weights += [np.stack(per_image(0, rw)),
                np.stack([with_grid_flip(cols, _grid(w, stride))
                          for cols, (_, w) in zip(per_image(1, rw), sizes)])]
  return weights


def _run_group(model, variables, images, scales, hflip, size_bucket, stage2_merge):
  """`multiscale` of images sharing one `_group_key`: one device call per scale."""
  rule, stride = inference_rule(model, variables)
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

    if rule == "single_stage":
      def sources(grid_stride):
        rows = np.stack([_composed_source(_grid(h, grid_stride), h, height, out_h)
                         for (h, _), (height, _) in zip(sizes, shapes)])
        cols = np.stack([with_flip(_composed_source(_grid(w, grid_stride), w, width, out_w), width)
                         for (_, w), (_, width) in zip(sizes, shapes)])
        return rows, cols

      sums = _single_stage_sums(model, variables, views, *sources(SEG_STRIDE), *sources(stride),
                                _valid_cells(sizes, padded_h, padded_w, stride))
    elif rule == "stage2":
      rows = np.stack([_bilinear_matrix(_grid(h, stride), height, _grid(padded_h, stride), out_h)
                       for (h, _), (height, _) in zip(sizes, shapes)])
      cols = np.stack([with_flip(_bilinear_matrix(_grid(w, stride), width,
                                                  _grid(padded_w, stride), out_w), width)
                       for (_, w), (_, width) in zip(sizes, shapes)])
      sums = _stage2_sums(model, variables, views, rows, cols)
    else:  # "cam" (A.5)
      weights = _cam_matrices(sizes, shapes, (padded_h, padded_w), (out_h, out_w), stride,
                              num_flips)
      sums = _cam_sums(model, stride, variables, views, *weights,
                       _valid_cells(sizes, padded_h, padded_w, stride))
    totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
  num_views = num_flips * len(scales)
  results = []
  for i, (height, width) in enumerate(shapes):
    total = [np.asarray(part[i], np.float32) for part in totals]
    extra = {}
    if rule == "cam":  # A.5: the sum over the views, no mean; `segment` normalises it per class
      heat = total[0][:height, :width]
      probs = np.concatenate([np.zeros_like(heat[..., :1]), heat], axis=-1)
      extra["rw_cams"] = total[1][:_grid(height, RW_STRIDE), :_grid(width, RW_STRIDE)]
      pred_class = total[2] / num_views
    elif rule == "stage2":
      probs = total[0][:height, :width] / num_views
      if stage2_merge == "sum_logits":
        logits = total[1][:height, :width]
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
      heat = probs[..., 1:]
      pred_class = heat.max(axis=(0, 1))
    else:
      probs = total[0][:height, :width] / num_views
      heat = total[1][:height, :width] / num_views
      pred_class = total[2] / num_views
    results.append({"pred_class": pred_class, "pred_mask": probs,
                    "cams": heat / (heat.max(axis=(0, 1)) + 1e-5), "rule": rule, **extra})
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
  """Averages a network over scales and flips (spec 8.1 step 1; spec 9 for stage-2 networks;
  components spec A.5 for CAM-only networks).

  model, variables: the single-stage `RSEPMNet` (with its decoder), a stage-2 network (its
    outputs have no "cams") or a CAM-only network (no "seg_logits": `RSEPMNet` with
    `with_decoder=False`), with evaluation variables.
  image: uint8 RGB `[H, W, 3]`, any size.
  Returns numpy arrays:
    pred_mask: `[H, W, C + 1]`, the mean softmax (background first); stage 2: per
      `stage2_merge`, by default the softmax of the summed logits; CAM-only: channel 0 zero,
      then the relu CAMs summed over the views (A.5's `hr_cam` before its normalisation);
    pred_class: `[C]`, the mean over views of `sigmoid(cls_logits)`; stage 2: the maximum of
      each class's probability over the image;
    cams: `[H, W, C]`, the mean relu CAM, nearest-resized like the logits, each class divided
      by its maximum (+1e-5); stage 2: the class probabilities so normalised; CAM-only: A.5's
      `hr_cam` (the bilinear sum of `pred_mask` so normalised);
    rw_cams (CAM-only networks only): `[ceil(H / 4), ceil(W / 4), C]`, A.5's `cam` before its
      normalisation: each view's relu CAMs (flip un-flipped on the grid) bilinearly resized
      straight to the random walk's grid, summed;
  and `rule`: the rule used, one of RULES.
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
  (`settings`): stage 2 gates by `stage2_class_th` and keeps the softmax as is; the single-stage
  and CAM-only rules gate by `conf_th` and add the background of `settings.background`."""
  if scores["rule"] == "stage2":
    return segment(scores["pred_mask"], scores["pred_class"], tags,
                   conf_th=settings.stage2_class_th, softmax_as_is=True)
  constant = settings.background == "constant"
  return segment(scores["pred_mask"], scores["pred_class"], tags, conf_th=settings.conf_th,
                 bg_gamma=settings.bg_gamma, bg_threshold=settings.bg_threshold if constant else None)
