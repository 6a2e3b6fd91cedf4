"""IRNet's boundary-based random walk (components_spec D.2), without an N x N matrix, NHWC.

Geometry (static numpy, cached per radius r, an int >= 2):
  * `directions(r)`: the forward half-disc {(0, dx): 1 <= dx < r} then
    {(dy, dx): 1 <= dy < r, |dx| < r, dy^2 + dx^2 < r^2} row by row: 34 for r = 5, 152 for
    r = 10. IRNet enumerates the same set but groups it by path length; only the order of the
    D axis differs.
  * `path_cells(dy, dx)`: the cells (y, x) of the bounding box of the segment (0, 0)-(dy, dx)
    whose squared distance to its line, (dy x - dx y)^2 / (dy^2 + dx^2), is < 1 (both ends
    included), row-major.

`edge_to_affinity`: a pixel's affinity with its neighbour p + d is 1 - max of the edge
probability over the path's cells. The edge is padded with 1.0 on the left, right and bottom as
IRNet does, so a neighbour outside the image (its own cell is on the path) gets affinity 0.

`propagate` is IRNet's `propagate_to_edge` as the spec's [PROPOSAL] computes it. IRNet builds the
dense symmetric A (diagonal 1, out-of-image pairs cropped away), T = A^beta / colsum and
rw = x T^(2^exp_times) with x = scores * (1 - edge). Since A is symmetric, one step of x T is
  x_j <- (x_j + sum_{i in N(j)} A_ij^beta x_i) / (1 + sum_{i in N(j)} A_ij^beta)
over the 2 D neighbours N(j) = {j + d} U {j - d}, so 2^exp_times such local steps give the same
result (up to float rounding) in O(2^exp_times N (2 D + 1) K) with no N x N array.

Batches of images padded to one size: set the edge to 1.0 outside each image's rectangle. Every
pair with an end outside then has weight 0, the source is 0 there, and the walk inside equals
IRNet's on the unpadded image (a pair inside a rectangle has its whole path inside it). Only
`random_walk_scores`' x4 upsampling differs at the image's last 2 rows / columns when 4 h or 4 w
exceeds its size by less than 2 (it blends with the padding instead of clamping).

Gradients (training through `edge_to_affinity`): the max sends the gradient to the path's
maximal cell; exact ties share it evenly (PyTorch's max_pool2d gives it to one cell).

Measured on this project's 2-core CPU: `random_walk_labels` on a 125 x 94 grid (a 500 x 375 VOC
image), 20 classes, r = 5, 256 steps: 0.85 s, 1.8 s compile; IRNet's loss and its gradient for
4 x 128 x 128 edge logits at r = 10: 1.05 s, 4 s compile.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rsepm_jax import image_ops

# Directions whose path maxima `edge_to_affinity` computes together.
_DIRECTION_CHUNK = 8


def _check_radius(radius):
  if not isinstance(radius, (int, np.integer)) or radius < 2:
    raise ValueError(f"random_walk: radius must be an int >= 2, got {radius!r}.")


@functools.lru_cache(maxsize=None)
def directions(radius):
  """Forward half-disc offsets of IRNet's radius: int32 numpy [D, 2] of (dy, dx), read-only."""
  _check_radius(radius)
  offsets = [(0, dx) for dx in range(1, radius)]
  offsets += [(dy, dx) for dy in range(1, radius) for dx in range(1 - radius, radius)
              if dy * dy + dx * dx < radius * radius]
  result = np.asarray(offsets, np.int32)
  result.flags.writeable = False
  return result


@functools.lru_cache(maxsize=None)
def path_cells(dy, dx):
  """Cells on the path from (0, 0) to (dy, dx): int32 numpy [L, 2] of (y, x), read-only."""
  if dy == 0 and dx == 0:
    raise ValueError("random_walk.path_cells: the offset (0, 0) has no path.")
  length_sq = dy * dy + dx * dx
  cells = [(y, x)
           for y in range(min(0, dy), max(0, dy) + 1)
           for x in range(min(0, dx), max(0, dx) + 1)
           if (dy * x - dx * y) ** 2 < length_sq]
  result = np.asarray(cells, np.int32)
  result.flags.writeable = False
  return result


def crop_pairs(x, radius):
  """IRNet's training crop of per-pixel pair maps: `[..., h, w]` -> `[..., h - r + 1, w - 2r + 2]`.

  Keeps the sources (y, x) with y < h - (r - 1) and r - 1 <= x < w - (r - 1): exactly those
  whose every forward neighbour is inside the image (IRNet's `PathIndex` src indices).
  """
  _check_radius(radius)
  margin = radius - 1
  height, width = x.shape[-2:]
  if height <= margin or width <= 2 * margin:
    raise ValueError(f"random_walk.crop_pairs: a {height}x{width} grid has no pairs for radius "
                     f"{radius} (needs height > {margin} and width > {2 * margin}).")
  return x[..., :height - margin, margin:width - margin]


@functools.lru_cache(maxsize=None)
def _path_table(radius):
  """`[D, L, 2]` int32 path cells of every direction, padded to the longest path by repeating
  a path's last cell (which leaves the max over the path unchanged)."""
  paths = [path_cells(int(dy), int(dx)) for dy, dx in directions(radius)]
  longest = max(len(path) for path in paths)
  table = np.stack([np.concatenate([path, np.repeat(path[-1:], longest - len(path), axis=0)])
                    for path in paths])
  table.flags.writeable = False
  return table


def edge_to_affinity(edge, radius):
  """Affinity of every pixel with its forward neighbours.

  Args:
    edge: [B, h, w] float boundary probability (already a sigmoid).
    radius: static int, the direction set `directions(radius)`.

  Returns:
    [B, D, h, w] float: 1 - max of `edge` over `path_cells(dy, dx)` from pixel (y, x) for
    direction d = (dy, dx); 0 where (y + dy, x + dx) is outside the image.

  The directions are a `lax.map` over chunks of `_DIRECTION_CHUNK`, each cell a dynamic slice
  and the body rematerialised: one slice per path cell (2134 at r = 10) made the graph slow to
  compile with its gradient, and saving every cell for the backward pass would hold
  D L B h w floats (7 GB for IRNet's batch of 32 at 128 x 128).
  """
  _check_radius(radius)
  batch, height, width = edge.shape
  padded = jnp.pad(edge, ((0, 0), (0, radius), (radius, radius)), constant_values=1.0)

  def path_max(cells):  # [L, 2] -> [B, h, w]
    def cell(offset):
      return jax.lax.dynamic_slice(padded, (0, offset[0], radius + offset[1]),
                                   (batch, height, width))
    return jnp.max(jax.vmap(cell)(cells), axis=0)

  maxima = jax.lax.map(jax.checkpoint(path_max), jnp.asarray(_path_table(radius)),
                       batch_size=_DIRECTION_CHUNK)
  return 1.0 - jnp.moveaxis(maxima, 0, 1)


def propagate(scores, edge, radius=5, beta=10, exp_times=8):
  """IRNet's `propagate_to_edge` by 2^exp_times local column-normalised steps. Jittable.

  Args:
    scores: [B, h, w, K] float source scores (IRNet: stride-4 foreground CAMs, max-normalised).
    edge: [B, h, w] float boundary probability on the same grid.
    radius: static int, neighbourhood radius (IRNet inference: 5).
    beta: affinity exponent (may be traced).
    exp_times: static int; the walk takes 2^exp_times steps.

  Returns:
    [B, h, w, K] float32 rw = x T^(2^exp_times), x = scores * (1 - edge).
  """
  if scores.ndim != 4 or edge.shape != scores.shape[:3]:
    raise ValueError(f"random_walk.propagate: expected scores [B, h, w, K] and edge [B, h, w] on "
                     f"the same grid, got {scores.shape} and {edge.shape}.")
  height, width = edge.shape[1:]
  offsets = directions(radius)
  edge = edge.astype(jnp.float32)
  forward = edge_to_affinity(edge, radius) ** beta  # [B, D, h, w]: A(p, p + d)^beta
  # backward[d] at p is A(p - d, p)^beta = forward[d] at p - d (0 outside the image).
  padded = jnp.pad(forward, ((0, 0), (0, 0), (radius, radius), (radius, radius)))
  backward = jnp.stack(
      [padded[:, k, radius - dy:radius - dy + height, radius - dx:radius - dx + width]
       for k, (dy, dx) in enumerate(offsets)], axis=1)
  norm = 1.0 / (1.0 + forward.sum(axis=1) + backward.sum(axis=1))  # 1 / colsum, [B, h, w]
  self_weight = norm[..., None]
  forward = jnp.moveaxis(forward * norm[:, None], 1, 0)[..., None]  # [D, B, h, w, 1]
  backward = jnp.moveaxis(backward * norm[:, None], 1, 0)[..., None]

  def step(_, x):
    xp = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)))
    out = self_weight * x
    for k, (dy, dx) in enumerate(offsets):
      out += forward[k] * xp[:, radius + dy:radius + dy + height, radius + dx:radius + dx + width]
      out += backward[k] * xp[:, radius - dy:radius - dy + height, radius - dx:radius - dx + width]
    return out

  source = scores.astype(jnp.float32) * (1.0 - edge)[..., None]
  return jax.lax.fori_loop(0, 2 ** exp_times, step, source)


def random_walk_scores(scores, edge, image_size, radius=5, beta=10, exp_times=8):
  """Spec D.2 steps 5-6: `propagate`, bilinear x4 upsampling, crop, division by the global max.

  Args:
    scores: [B, h, w, C] foreground scores at stride 4 (max-normalised CAMs; absent classes 0).
    edge: [B, h, w] boundary probability at stride 4.
    image_size: static (H, W) with H <= 4 h and W <= 4 w.
    radius, beta, exp_times: as in `propagate`.

  Returns:
    [B, H, W, C] float32 scores divided by each image's max over classes and pixels (all 0
    where an image's walk is 0 everywhere).
  """
  height, width = image_size
  if height > 4 * edge.shape[1] or width > 4 * edge.shape[2]:
    raise ValueError(f"random_walk: image_size {image_size} exceeds 4x the stride-4 grid "
                     f"{edge.shape[1:]}.")
  rw = propagate(scores, edge, radius, beta, exp_times)
  rw = image_ops.resize_bilinear(rw, (4 * edge.shape[1], 4 * edge.shape[2]))[:, :height, :width]
  peak = rw.max(axis=(1, 2, 3), keepdims=True)
  return jnp.where(peak > 0, rw / jnp.where(peak > 0, peak, 1.0), 0.0)


def random_walk_labels(scores, edge, image_size, bg_threshold=0.25, radius=5, beta=10,
                       exp_times=8):
  """Spec D.2 steps 5-7: random-walk labels with a constant background score.

  Args: as `random_walk_scores`, plus `bg_threshold` (IRNet 0.25, Puzzle-CAM 0.35).

  Returns:
    [B, H, W] uint8: 0 where no class beats `bg_threshold`, else 1 + the argmax class
    (first class on ties; background wins a tie with the threshold).
  """
  rw = random_walk_scores(scores, edge, image_size, radius, beta, exp_times)
  background = jnp.full(rw.shape[:3] + (1,), bg_threshold, rw.dtype)
  return jnp.argmax(jnp.concatenate([background, rw], axis=-1), axis=-1).astype(jnp.uint8)
