"""Built-in synthetic weakly-supervised segmentation data (numpy only, no downloads).

Each image shows 1-3 objects on a cluttered background (colour gradient, smooth illumination,
flat blobs, rectangles and straight lines that are all background) with mild pixel noise. A
class is its outline plus its texture family; colours are random for every class, so colour
alone identifies nothing. Objects occlude each other and have hard edges, so a stride-16 CAM is
blobby and leaks over borders while edge-aware refinement (PAMR, Canny, EPM) has edges to snap
to. Masks carry a VOC-like 255 band on object borders; tags come from the visible mask.
"""
import math
import zlib

import numpy as np

MAX_OBJECTS = 3
MIN_IMAGE_SIZE = 32
# Default object diameter range as a fraction of the image side (never below
# MIN_OBJECT_DIAMETER px).
OBJECT_DIAMETER_RANGE = (0.15, 0.6)
MIN_OBJECT_DIAMETER = 10.0
# A class is tagged iff at least this fraction of the image (and at least
# MIN_VISIBLE_PIXELS) stays visible after occlusion, MIN_CORE_PIXELS of them outside the
# ignore band; otherwise it is removed from the scene.
MIN_VISIBLE_FRACTION = 0.01
MIN_VISIBLE_PIXELS = 12
MIN_CORE_PIXELS = 4
# Texture period range in px at 64 px; textures scale with the image side.
TEXTURE_PERIOD_RANGE_64PX = (4.0, 6.0)
# Colour candidates per object; the first far enough from what lies around it is used.
COLOUR_CANDIDATES = 8
MIN_COLOUR_DISTANCE = 110.0
PIXEL_NOISE_STD = 3.5
ILLUMINATION_STD = 9.0
# Smooth fields (illumination + pixel noise, blob field) are windows of banks of side
# BANK_SIDE_FACTOR * S, at a random offset and row flip per record.
BANK_SIDE_FACTOR = 3
# Smooth fields are sums of this many separable products of low-frequency sinusoids per
# image area.
NUM_SMOOTH_TERMS = 6
SMOOTH_CYCLES_RANGE = (0.3, 1.8)  # Cycles per image side.
# Texture and gradient weights are quantised to this many levels for the palette lookup.
WEIGHT_LEVELS = 64
# Paint layers: background clutter first, then one layer per object in drawing order.
GRADIENT_LAYER = 0
BLOB_LAYER = 1
RECTANGLE_LAYERS = (2, 3)
LINE_LAYERS = (4, 5, 6)
OBJECT_LAYER = 7
NUM_LAYERS = OBJECT_LAYER + MAX_OBJECTS
# HSV (low, high) of the colours drawn per scene: the gradient's two ends (dull), one per
# flat clutter layer (anything), then COLOUR_CANDIDATES per object (saturated). V is 0..255.
_GRADIENT_HSV = ((0.0, 0.0, 64.0), (1.0, 0.35, 217.0))
_CLUTTER_HSV = ((0.0, 0.0, 25.0), (1.0, 0.9, 255.0))
_OBJECT_HSV = ((0.0, 0.35, 90.0), (1.0, 1.0, 255.0))
_SCENE_HSV_BOUNDS = np.array([_GRADIENT_HSV] * 2 + [_CLUTTER_HSV] * (OBJECT_LAYER - 1)
                             + [_OBJECT_HSV] * (COLOUR_CANDIDATES * MAX_OBJECTS))  # [N, 2, 3]
_SCENE_HSV_LOW = _SCENE_HSV_BOUNDS[:, 0]
_SCENE_HSV_SPAN = _SCENE_HSV_BOUNDS[:, 1] - _SCENE_HSV_BOUNDS[:, 0]

# Outlines: `(u, v)` are object-frame coordinates scaled so the outline fits the unit circle.


def _disc(u, v):
  return u * u + v * v <= 1.0


def _square(u, v):
  return np.maximum(np.abs(u), np.abs(v)) <= 0.72


def _triangle(u, v):
  """Equilateral triangle, circumradius 1, apex on +v."""
  return (v >= -0.5) & (math.sqrt(3.0) * np.abs(u) + v <= 1.0)


def _star(u, v, points=5, inner_radius=0.5):
  """Five-pointed star: fold the angle into one tip-to-inner-vertex half sector."""
  half_sector = math.pi / points
  folded = half_sector - np.abs(np.mod(np.arctan2(v, u), 2 * half_sector) - half_sector)
  radius = np.hypot(u, v)
  # Edge from the tip (1, 0) to the inner vertex; the origin side is inside.
  edge_x = inner_radius * math.cos(half_sector) - 1.0
  edge_y = inner_radius * math.sin(half_sector)
  return edge_x * radius * np.sin(folded) - edge_y * (radius * np.cos(folded) - 1.0) >= 0.0


def _ring(u, v):
  radius_sq = u * u + v * v
  return (radius_sq <= 1.0) & (radius_sq >= 0.25)


def _cross(u, v):
  abs_u, abs_v = np.abs(u), np.abs(v)
  return (np.minimum(abs_u, abs_v) <= 0.32) & (np.maximum(abs_u, abs_v) <= 0.95)


def _hexagon(u, v):
  """Regular hexagon, circumradius 1, vertices on the v axis."""
  abs_u, abs_v = np.abs(u), np.abs(v)
  inradius = math.sqrt(3.0) / 2
  return (abs_u <= inradius) & (0.5 * abs_u + inradius * abs_v <= inradius)


def _crescent(u, v):
  return _disc(u, v) & ((u - 0.5) ** 2 + v * v > 0.64)


def _ellipse(u, v):
  return u * u + (v / 0.55) ** 2 <= 1.0


def _chevron(u, v):
  abs_v = np.abs(v)
  offset = u - abs_v
  return (offset >= -0.8) & (offset <= -0.05) & (abs_v <= 0.75)


# Textures: `(dx, dy)` are image-frame offsets from the object centre in px; each returns the
# mixing weight of the object's second colour in [0, 1]. Orientations are invariant under
# horizontal flips, so flip augmentation keeps each class's texture.


def _sine(cycles):
  return 0.5 + 0.5 * np.sin(2 * math.pi * cycles)


def _horizontal_stripes(dx, dy, period, phase):
  del dx
  return _sine(dy / period + phase)


def _checker(dx, dy, period, phase):
  product = np.sin(2 * math.pi * (dx / period + phase)) * np.sin(2 * math.pi * (dy / period))
  return np.clip(0.5 + 2.0 * product, 0.0, 1.0)


def _vertical_stripes(dx, dy, period, phase):
  del dy
  return _sine(dx / period + phase)


def _dots(dx, dy, period, phase):
  lattice = np.cos(2 * math.pi * (dx / period + phase)) + np.cos(2 * math.pi * dy / period)
  return np.clip(lattice - 0.6, 0.0, 1.0)


def _concentric_rings(dx, dy, period, phase):
  return _sine(np.hypot(dx, dy) / period + phase)


def _speckle(dx, dy, period, phase):
  """Random blocks of half a period: an exact integer hash of the block coordinates."""
  block = max(period / 2, 1.0)
  block_x = np.floor(dx / block).astype(np.int64).astype(np.uint32)
  block_y = np.floor(dy / block).astype(np.int64).astype(np.uint32)
  hashed = (block_x * np.uint32(0x9E3779B1)) ^ (block_y * np.uint32(0x85EBCA77)) ^ np.uint32(
      int(phase * 0xFFFF))
  hashed = (hashed ^ (hashed >> np.uint32(15))) * np.uint32(0x2C1B3C6D)
  return (hashed >> np.uint32(16)).astype(np.float32) / 65535.0


def _crosshatch(dx, dy, period, phase):
  diagonal_period = period * math.sqrt(2.0)
  return np.maximum(_sine((dx + dy) / diagonal_period + phase),
                    _sine((dx - dy) / diagonal_period + phase))


def _waves(dx, dy, period, phase):
  return _sine((dy + 0.4 * period * np.sin(math.pi * dx / period)) / period + phase)


def _grid_lines(dx, dy, period, phase):
  on_column = np.mod(dx / period + phase, 1.0) < 0.3
  on_row = np.mod(dy / period + phase, 1.0) < 0.3
  return (on_column | on_row).astype(np.float32)


def _spokes(dx, dy, period, phase):
  del period
  return _sine(7 * np.arctan2(dy, dx) / (2 * math.pi) + phase)


# Class c (mask id c + 1): (name, outline, texture family).
_CLASSES = (
    ("disc", _disc, _horizontal_stripes),
    ("square", _square, _checker),
    ("triangle", _triangle, _vertical_stripes),
    ("star", _star, _dots),
    ("ring", _ring, _concentric_rings),
    ("cross", _cross, _speckle),
    ("hexagon", _hexagon, _crosshatch),
    ("crescent", _crescent, _waves),
    ("ellipse", _ellipse, _grid_lines),
    ("chevron", _chevron, _spokes),
)
CLASS_NAMES = tuple(name for name, _, _ in _CLASSES)


def _hsv_to_rgb(hsv):
  """`hsv: [N, 3]` (H, S in [0, 1], V in 0..255) -> RGB `[N, 3]` float32."""
  sector = np.array([5.0, 3.0, 1.0]) + 6.0 * hsv[:, 0:1]
  np.mod(sector, 6.0, out=sector)
  ramp = np.minimum(sector, 4.0 - sector)
  np.maximum(ramp, 0.0, out=ramp)
  np.minimum(ramp, 1.0, out=ramp)
  return (hsv[:, 2:3] * (1.0 - hsv[:, 1:2] * ramp)).astype(np.float32)


def _smooth_field(rng, cycle_coords, channels, num_terms):
  """Random smooth field `[N, N, channels]` float32, std about 1 per channel.

  A sum of `num_terms` products of row and column sinusoids of SMOOTH_CYCLES_RANGE cycles
  per image side; `cycle_coords [N]` is 2 pi coordinate / image side.
  """
  size = cycle_coords.shape[0]
  low, high = SMOOTH_CYCLES_RANGE
  freq, phase = rng.random((2, 2, num_terms, 1))
  row_waves, col_waves = np.sin((low + (high - low) * freq) * cycle_coords + 2 * math.pi * phase)
  # A product of two random-phase sinusoids has variance 1/4, so the sum has std 0.5 |w|.
  weights = rng.standard_normal((num_terms, 1, channels)) * (2.0 / math.sqrt(num_terms))
  col_terms = (col_waves[:, :, None] * weights).reshape(num_terms, -1)
  return (row_waves.T @ col_terms).reshape(size, size, channels).astype(np.float32)


def _farthest_colour(candidates, references):
  """The first of `candidates` (RGB lists) at least MIN_COLOUR_DISTANCE from every colour in
  `references`, else the one farthest from its nearest reference."""
  best, best_distance_sq = candidates[0], -1.0
  for candidate in candidates:
    red, green, blue = candidate
    distance_sq = min((red - r) ** 2 + (green - g) ** 2 + (blue - b) ** 2
                      for r, g, b in references)
    if distance_sq >= MIN_COLOUR_DISTANCE ** 2:
      return candidate
    if distance_sq > best_distance_sq:
      best, best_distance_sq = candidate, distance_sq
  return best


def _max_filter(values, radius):
  """Maximum over the (2 radius + 1)^2 window of an `[S, S]` array (edges replicated)."""
  row_max = values.copy()
  for shift in range(1, radius + 1):
    np.maximum(row_max[shift:], values[:-shift], out=row_max[shift:])
    np.maximum(row_max[:-shift], values[shift:], out=row_max[:-shift])
  window_max = row_max.copy()
  for shift in range(1, radius + 1):
    np.maximum(window_max[:, shift:], row_max[:, :-shift], out=window_max[:, shift:])
    np.maximum(window_max[:, :-shift], row_max[:, shift:], out=window_max[:, :-shift])
  return window_max


class SyntheticWSSS:
  """Grain random-access source of procedural WSSS records (spec 7.3 record format).

  Record i depends only on (constructor arguments, i), so any index can be read in any order
  and process. Records: `{"image": uint8 [S, S, 3], "mask": uint8 [S, S] (0 = background,
  c + 1 = class c, 255 = ignore), "labels": float32 [C], "id": str}`.

  A scene is painted as layers: a layer map `[S, S]` (which layer each pixel shows) and a
  weight map `[S, S]` in [0, 1]; layer l shows `(1 - weight) * colours[l, 0] + weight *
  colours[l, 1]` (a gradient, a flat colour or a two-colour texture). The image is one
  palette lookup of (layer, quantised weight) plus a window of an illumination-plus-noise
  bank: few numpy calls per record, as the cost is mostly per-call overhead at these sizes.
  """

  def __init__(self, num_images, image_size=64, num_classes=6, seed=0, split="train",
               ignore_width=1, object_size=OBJECT_DIAMETER_RANGE):
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or (
        num_images < 1):
      raise ValueError(f"SyntheticWSSS: num_images must be a positive int, got {num_images!r}.")
    if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
      raise ValueError(f"SyntheticWSSS: image_size must be an int >= {MIN_IMAGE_SIZE}, got "
                       f"{image_size!r}.")
    if not isinstance(num_classes, (int, np.integer)) or not 1 <= num_classes <= len(_CLASSES):
      raise ValueError(f"SyntheticWSSS: num_classes must be in 1..{len(_CLASSES)} (shapes: "
                       f"{', '.join(CLASS_NAMES)}), got {num_classes!r}.")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
      raise ValueError(f"SyntheticWSSS: seed must be an int in [0, 2**32), got {seed!r}.")
    if not isinstance(split, str) or not split:
      raise ValueError(f"SyntheticWSSS: split must be a non-empty str, got {split!r}.")
    max_ignore_width = max(1, image_size // 32)
    if not isinstance(ignore_width, (int, np.integer)) or not (
        0 <= ignore_width <= max_ignore_width):
      raise ValueError(f"SyntheticWSSS: ignore_width must be an int in 0..{max_ignore_width} "
                       f"for image_size {image_size}, got {ignore_width!r}.")
    if (len(object_size) != 2 or not 0 < object_size[0] <= object_size[1] <= 1):
      raise ValueError(f"SyntheticWSSS: object_size must be (low, high) fractions of the image "
                       f"side with 0 < low <= high <= 1, got {object_size!r}.")
    self.object_size = (float(object_size[0]), float(object_size[1]))
    self.num_images = int(num_images)
    self.image_size = int(image_size)
    self.num_classes = int(num_classes)
    self.seed = int(seed)
    self.split = split
    self.ignore_width = int(ignore_width)
    self.class_names = CLASS_NAMES[:num_classes]
    # crc32 is stable across processes (unlike hash()), so workers agree on the streams.
    self._split_id = zlib.crc32(split.encode("utf-8"))
    self._min_visible = max(MIN_VISIBLE_PIXELS,
                            int(round(MIN_VISIBLE_FRACTION * image_size * image_size)))
    self._coords = np.arange(image_size, dtype=np.float32) + 0.5
    self._centred = self._coords - image_size / 2
    levels = np.linspace(0.0, 1.0, WEIGHT_LEVELS, dtype=np.float32)
    self._level_mix = np.stack([1.0 - levels, levels], axis=1)  # [WEIGHT_LEVELS, 2]
    # Scales of uniform draws: rectangle (top, left, height - 4, width - 4) and line
    # (x0, y0, angle).
    self._box_scale = np.array([image_size - 4] * 2 + [0.45 * image_size - 4] * 2)
    self._line_scale = np.array([image_size, image_size, math.pi]).reshape(3, 1, 1)
    # Records take windows of these banks: drawing the smooth fields and 3 S^2 noise values
    # afresh would cost more than the rest of the record.
    bank_rng = np.random.default_rng([self.seed, self._split_id])
    bank_side = BANK_SIDE_FACTOR * image_size
    bank_cycles = 2 * math.pi * (np.arange(bank_side) + 0.5) / image_size
    bank_terms = NUM_SMOOTH_TERMS * BANK_SIDE_FACTOR ** 2
    self._nuisance_bank = (
        ILLUMINATION_STD * _smooth_field(bank_rng, bank_cycles, 3, bank_terms)
        + PIXEL_NOISE_STD * bank_rng.standard_normal((bank_side, bank_side, 3),
                                                     dtype=np.float32))
    self._blob_bank = _smooth_field(bank_rng, bank_cycles, 1, bank_terms)[..., 0]

  def __len__(self):
    return self.num_images

  def __repr__(self):
    return (f"SyntheticWSSS(num_images={self.num_images}, image_size={self.image_size}, "
            f"num_classes={self.num_classes}, seed={self.seed}, split={self.split!r}, "
            f"ignore_width={self.ignore_width}, object_size={self.object_size})")

  def __getitem__(self, index):
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"SyntheticWSSS: index must be an int, got {index!r}.")
    if not -self.num_images <= index < self.num_images:
      raise IndexError(f"SyntheticWSSS: index {index} out of range for {self.num_images} "
                       "images.")
    index = int(index) % self.num_images
    # Philox is counter-based: keying it by (index, seed, split) gives independent streams
    # without SeedSequence's hashing cost.
    rng = np.random.Generator(np.random.Philox(
        key=np.array([index, (self.seed << 32) | self._split_id], np.uint64)))
    while True:  # Resample the scene in the rare case that no object stays visible.
      hsv = rng.random(_SCENE_HSV_LOW.shape)
      colours = _hsv_to_rgb(_SCENE_HSV_LOW + _SCENE_HSV_SPAN * hsv)
      layer, weight, layer_colours = self._background(rng, colours[:OBJECT_LAYER + 1])
      objects = self._sample_objects(rng, layer, weight, layer_colours,
                                     colours[OBJECT_LAYER + 1:].reshape(MAX_OBJECTS, -1, 3))
      mask, drawn = self._visible_layout(objects)
      if drawn:
        break
    self._paint_objects(objects, drawn, layer, weight)
    palette = (self._level_mix @ layer_colours).reshape(-1, 3)  # [layer, level] -> RGB
    quantised = (weight * (WEIGHT_LEVELS - 1) + 0.5).astype(np.uint16)
    quantised += layer * np.uint16(WEIGHT_LEVELS)
    image = np.take(palette, quantised, axis=0)
    image += self._bank_window(rng, self._nuisance_bank)
    np.maximum(image, 0.0, out=image)
    np.minimum(image, 255.0, out=image)
    labels = np.zeros(self.num_classes, np.float32)
    labels[[objects[k]["class_index"] for k in drawn]] = 1.0
    return {
        "image": image.astype(np.uint8),
        "mask": mask,
        "labels": labels,
        "id": f"synthetic_{self.split}_{index:06d}",
    }

  def _background(self, rng, colours):
    """Background layers: a gradient, a smooth flat blob, 0-2 rectangles and 1-3 lines.

    colours: `[OBJECT_LAYER + 1, 3]`, the gradient's two ends then one per clutter layer.
    Returns layer map `[S, S]` uint16, weight map `[S, S]` float32 and the layer colours
    `[NUM_LAYERS, 2, 3]` (weight 0 and weight 1; object rows filled by `_sample_objects`).
    """
    size, coords = self.image_size, self._coords
    layer_colours = np.zeros((NUM_LAYERS, 2, 3), np.float32)
    layer_colours[GRADIENT_LAYER] = colours[:2]
    layer_colours[GRADIENT_LAYER + 1:OBJECT_LAYER] = colours[2:, None]  # Flat colours.
    ramp_angle, blob_draw, blob_level, num_rectangles, num_lines = rng.random(5).tolist()
    # Gradient weight in [0, 1] along a random direction: a column term plus a row term.
    ramp_scale = 1.0 / (math.sqrt(2.0) * size)
    ramp_x = self._centred * (math.cos(2 * math.pi * ramp_angle) * ramp_scale) + 0.5
    ramp_y = self._centred * (math.sin(2 * math.pi * ramp_angle) * ramp_scale)
    weight = ramp_x[None, :] + ramp_y[:, None]
    layer = np.zeros((size, size), np.uint16)
    if blob_draw < 0.7:
      np.putmask(layer, self._bank_window(rng, self._blob_bank) > 0.6 + 0.6 * blob_level,
                 BLOB_LAYER)
    boxes = (rng.random((len(RECTANGLE_LAYERS), 4)) * self._box_scale).astype(int).tolist()
    for layer_id, (top, left, height, width) in zip(
        RECTANGLE_LAYERS[:int(num_rectangles * (len(RECTANGLE_LAYERS) + 1))], boxes):
      layer[top:top + height + 4, left:left + width + 4] = layer_id
    # Line k passes through (x0, y0) at `angle`; a pixel's distance to it is |across - along|.
    x0, y0, angle = rng.random((3, len(LINE_LAYERS), 1)) * self._line_scale
    across = (coords - x0) * np.sin(angle)
    along = (coords - y0) * np.cos(angle)
    half_widths = rng.random(len(LINE_LAYERS)) * (0.7 * size / 64) + 0.5 * size / 64
    for k in range(1 + int(num_lines * len(LINE_LAYERS))):
      distance = np.abs(across[k][None, :] - along[k][:, None])
      np.putmask(layer, distance < half_widths[k], LINE_LAYERS[k])
    return layer, weight, layer_colours

  def _sample_objects(self, rng, layer, weight, layer_colours, candidate_colours):
    """1-3 objects in drawing order (dicts: class, geometry, texture, outline box and pixels).

    Fills the object rows of `layer_colours`: of the object's candidate colours
    (`candidate_colours [MAX_OBJECTS, COLOUR_CANDIDATES, 3]`) the first one at least
    MIN_COLOUR_DISTANCE from the background under its centre and from earlier objects (else
    the farthest), and that colour shaded towards black or white for the texture.
    """
    size = self.image_size
    num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if num_objects <= self.num_classes:
      classes = rng.permutation(self.num_classes)[:num_objects].tolist()
    else:
      classes = rng.integers(0, self.num_classes, num_objects).tolist()
    draws = rng.random((num_objects, 13)).tolist()
    # Colour choice is a few dozen scalar operations: Python lists beat numpy calls here.
    colour_rows = layer_colours.tolist()
    candidates = candidate_colours.tolist()
    chosen = []
    objects = []
    for k, (class_index, draw) in enumerate(zip(classes, draws)):
      (diameter, overlap, partner, direction, reach, x, y, angle, aspect, period, phase, shade,
       shade_amount) = draw
      low, high = self.object_size
      radius = 0.5 * max((low + (high - low) * diameter) * size, MIN_OBJECT_DIAMETER)
      if objects and overlap < 0.6:  # Overlap an earlier object: occlusion is common.
        other = objects[int(partner * len(objects))]
        offset = (0.3 + 0.7 * reach) * (radius + other["radius"])
        x = other["centre"][0] + offset * math.cos(2 * math.pi * direction)
        y = other["centre"][1] + offset * math.sin(2 * math.pi * direction)
      else:
        x, y = size * (0.1 + 0.8 * x), size * (0.1 + 0.8 * y)
      centre = (min(max(x, 0.05 * size), 0.95 * size), min(max(y, 0.05 * size), 0.95 * size))
      row, col = int(centre[1]), int(centre[0])
      under, under_weight = int(layer[row, col]), float(weight[row, col])
      references = [[a + (b - a) * under_weight
                     for a, b in zip(*colour_rows[under])]] + chosen
      colour = _farthest_colour(candidates[k], references)
      chosen.append(colour)
      target, amount = (255.0 if shade < 0.5 else 0.0), 0.35 + 0.2 * shade_amount
      layer_colours[OBJECT_LAYER + k] = [colour, [c + (target - c) * amount for c in colour]]
      low, high = TEXTURE_PERIOD_RANGE_64PX
      obj = {
          "class_index": class_index,
          "centre": centre,
          "radius": radius,
          "period": (low + (high - low) * period) * size / 64,
          "phase": phase,
      }
      obj["box"], obj["inside"] = self._outline(obj, angle=2 * math.pi * angle,
                                                aspect=0.85 + 0.3 * aspect)
      objects.append(obj)
    return objects

  def _outline(self, obj, angle, aspect):
    """The object's bounding box `(y0, y1, x0, x1)` and its inside pixels `[y1-y0, x1-x0]`."""
    size, radius = self.image_size, obj["radius"]
    cx, cy = obj["centre"]
    extent = radius * max(aspect, 1.0 / aspect)  # The outline stays within this radius.
    x0, x1 = max(int(cx - extent) - 1, 0), min(int(cx + extent) + 2, size)
    y0, y1 = max(int(cy - extent) - 1, 0), min(int(cy + extent) + 2, size)
    dx = self._coords[x0:x1] - cx
    dy = self._coords[y0:y1] - cy
    cos, sin = math.cos(angle), math.sin(angle)
    u = (dx * (cos / (radius * aspect)))[None, :] + (dy * (sin / (radius * aspect)))[:, None]
    v = (dy * (cos * aspect / radius))[:, None] - (dx * (sin * aspect / radius))[None, :]
    return (y0, y1, x0, x1), _CLASSES[obj["class_index"]][1](u, v)

  def _visible_layout(self, objects):
    """Occlusion, ignore band and removal of classes that are hardly visible.

    Returns the mask `[S, S]` uint8 and the indices of the objects that stay, in drawing
    order (empty if none does). Each border between two different labels gets one band of
    `ignore_width` px on its object side (the lower object where two objects meet). A class
    stays iff at least `_min_visible` of its pixels are visible and MIN_CORE_PIXELS of them
    lie outside the band; otherwise its objects are removed (what lies below shows through).
    Removing a class can thin another's non-band area, hence the loop.
    """
    size, num_objects = self.image_size, len(objects)
    class_ids = [obj["class_index"] + 1 for obj in objects]
    drawn = list(range(num_objects))
    while True:
      class_map = np.zeros((size, size), np.uint8)
      # Depth rank: a class ranks as its top visible object; background ranks above all.
      rank_map = np.full((size, size), num_objects, np.int8)
      for k in drawn:
        y0, y1, x0, x1 = objects[k]["box"]
        np.putmask(class_map[y0:y1, x0:x1], objects[k]["inside"], class_ids[k])
        top = max(j for j in drawn if class_ids[j] == class_ids[k])
        np.putmask(rank_map[y0:y1, x0:x1], objects[k]["inside"], top)
      ignore = _max_filter(rank_map, self.ignore_width) > rank_map
      # One count of (class, in band): class c outside the band is c, inside 16 + c.
      counts = np.bincount((class_map + (ignore * np.uint8(16))).ravel(), minlength=32).tolist()
      kept = [k for k in drawn if counts[class_ids[k]] >= MIN_CORE_PIXELS
              and counts[class_ids[k]] + counts[16 + class_ids[k]] >= self._min_visible]
      if kept == drawn:
        return np.where(ignore, np.uint8(255), class_map), drawn
      drawn = kept

  def _paint_objects(self, objects, drawn, layer, weight):
    """Draws `objects[k]` for k in `drawn` into `layer` and `weight [S, S]` (in place)."""
    for k in drawn:
      obj = objects[k]
      y0, y1, x0, x1 = obj["box"]
      texture = _CLASSES[obj["class_index"]][2]
      pattern = texture((self._coords[x0:x1] - obj["centre"][0])[None, :],
                        (self._coords[y0:y1] - obj["centre"][1])[:, None], obj["period"],
                        obj["phase"])
      np.copyto(weight[y0:y1, x0:x1], pattern, where=obj["inside"])
      np.putmask(layer[y0:y1, x0:x1], obj["inside"], OBJECT_LAYER + k)

  def _bank_window(self, rng, bank):
    """An `[S, S, ...]` window of `bank` at a random offset, flipped upside down or not."""
    size = self.image_size
    top, left, flip = (rng.random(3) * [bank.shape[0] - size + 1, bank.shape[1] - size + 1,
                                        2]).astype(int).tolist()
    window = bank[top:top + size, left:left + size]
    return window[::-1] if flip else window


def from_config(data_config, split):
  """`SyntheticWSSS` for `split` from `config.data` (fields `num_classes`, `synthetic.*`).

  The "train" split has `synthetic.num_train` images, every other split `synthetic.num_eval`.
  """
  required = ("num_train", "num_eval", "image_size", "seed", "ignore_width")
  if "num_classes" not in data_config or "synthetic" not in data_config:
    raise KeyError("data config needs fields 'num_classes' and 'synthetic' for the synthetic "
                   "dataset.")
  synthetic = data_config.synthetic
  missing = [key for key in required if key not in synthetic]
  if missing:
    raise KeyError(f"data config 'synthetic' is missing {missing}; expected {list(required)}.")
  return SyntheticWSSS(
      synthetic.num_train if split == "train" else synthetic.num_eval,
      image_size=synthetic.image_size,
      num_classes=data_config.num_classes,
      seed=synthetic.seed,
      split=split,
      ignore_width=synthetic.ignore_width,
      object_size=tuple(synthetic.get("object_size", OBJECT_DIAMETER_RANGE)))
