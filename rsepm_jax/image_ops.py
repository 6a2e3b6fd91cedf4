"""Image normalisation and resizing with PyTorch semantics (spec 14.1), NHWC throughout.

* `resize_bilinear`: `F.interpolate(mode="bilinear", align_corners=False)`: half-pixel
  centres, no antialiasing, source coordinates clamped at the borders.
* `resize_bilinear_align_corners`: `align_corners=True` (PAMR's image resize).
* `resize_nearest`: PyTorch's legacy `nearest`, `src = floor(dst * in / out)`.

And `correlate_valid`, the 1-D pass of separable filters (Canny's blur and Sobel, the CRF's
Gaussian).
"""
from jax import lax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image):
  """uint8 or 0..255 float RGB `[..., 3]` -> ImageNet-normalised float32."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
  return (image.astype(jnp.float32) - mean) / std


def denormalize(image):
  """Inverse of `normalize`: float RGB in 0..255 (not rounded or clipped)."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
  return image * std + mean


def _linear_taps(in_size, out_size, align_corners):
  """Static (lo index, hi index, hi weight) numpy arrays for one axis."""
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = dst * scale
  else:
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  return lo, hi, frac


def _resize_axis_linear(x, axis, out_size, align_corners):
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  lo, hi, frac = _linear_taps(in_size, out_size, align_corners)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = jnp.asarray(frac, x.dtype).reshape(shape)
  return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


def resize_bilinear(x, size):
  """Bilinear resize of `x [B, H, W, C]` to `size = (h, w)`, align_corners=False."""
  x = _resize_axis_linear(x, 1, size[0], align_corners=False)
  return _resize_axis_linear(x, 2, size[1], align_corners=False)


def resize_bilinear_align_corners(x, size):
  """Bilinear resize of `x [B, H, W, C]` to `size = (h, w)`, align_corners=True."""
  x = _resize_axis_linear(x, 1, size[0], align_corners=True)
  return _resize_axis_linear(x, 2, size[1], align_corners=True)


def resize_nearest(x, size):
  """PyTorch legacy nearest resize of `x [B, H, W, ...]` to `size = (h, w)`."""
  rows = np.floor(np.arange(size[0]) * (x.shape[1] / size[0])).astype(np.int32)
  cols = np.floor(np.arange(size[1]) * (x.shape[2] / size[1])).astype(np.int32)
  return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


def box_mask(box, size):
  """`box [B, 4]` (top, left, bottom, right), exclusive ends -> bool `[B, h, w]` at `size`.

  The box is given in pixels of a grid of the same aspect at any resolution; callers pass
  it already scaled to `size` (see `scale_box`).
  """
  rows = jnp.arange(size[0])[None, :, None]
  cols = jnp.arange(size[1])[None, None, :]
  top, left, bottom, right = (box[:, i, None, None] for i in range(4))
  return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def scale_box(box, stride):
  """Map a pixel box `[B, 4]` onto a grid `stride` times coarser (floor, as DHR does).

  The far edges round up so a box never becomes empty while it covers any pixel.
  """
  top_left = box[:, :2] // stride
  bottom_right = -(-box[:, 2:] // stride)
  return jnp.concatenate([top_left, bottom_right], axis=1)


def correlate_valid(x, taps, axis):
  """Correlation of `x` with the 1-D `taps` (numbers) along `axis`, without padding: the axis
  shrinks by `len(taps) - 1`; zero taps are skipped.

  Callers pad once, with the border mode they need, before both passes of a separable filter
  (padding the fused output of a first pass again made XLA CPU several times slower).
  """
  size = x.shape[axis] - len(taps) + 1
  terms = [lax.slice_in_dim(x, offset, offset + size, axis=axis) * np.float32(tap)
           for offset, tap in enumerate(taps) if tap]
  return sum(terms[1:], terms[0])
