"""Per-record grain transforms for training and evaluation (spec 7.2), numpy + Pillow only.

Records follow the shared format: `image` uint8 [H, W, 3] RGB, `mask` uint8 [H, W] (255 =
ignore), `labels` float32 [C], `id` str. Every transform returns a new dict and passes the
keys it does not touch through unchanged. The last transform of each list adds `crop_box`
int32 [4] = (top, left, bottom, right), exclusive ends: the valid (non-padded) region.

Train: [RandomResizeLongSide] -> [RandomHorizontalFlip] -> [ColorJitter] -> RandomCrop.
Eval: PadToSize.
"""
import grain
import numpy as np
from PIL import Image

IMAGE_PAD_VALUE = 0
MASK_PAD_VALUE = 255
# ITU-R 601-2 luma, the weights Pillow and torchvision use for RGB -> grey.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


class RandomResizeLongSide(grain.transforms.RandomMap):
  """Scales the record so its long side is U{min_size..max_size} (inclusive), spec 7.2.

  The aspect ratio is kept (short side rounded). The image is resized bicubically with
  Pillow (antialiased when shrinking) and the mask with nearest neighbour, so the mask
  gets no new label values.
  """

  def __init__(self, min_size, max_size):
    if not 1 <= min_size <= max_size:
      raise ValueError(
          f"RandomResizeLongSide: expected 1 <= min_size <= max_size, got ({min_size}, "
          f"{max_size}); check data.resize_range.")
    self.min_size = int(min_size)
    self.max_size = int(max_size)

  def random_map(self, record, rng):
    height, width = record["mask"].shape
    long_side = int(rng.integers(self.min_size, self.max_size, endpoint=True))
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # Pillow: (w, h)
    image = Image.fromarray(record["image"]).resize(size, Image.Resampling.BICUBIC)
    mask = Image.fromarray(record["mask"]).resize(size, Image.Resampling.NEAREST)
    return {**record, "image": np.asarray(image), "mask": np.asarray(mask)}


class RandomHorizontalFlip(grain.transforms.RandomMap):
  """Mirrors image and mask left-right together with probability `p` (spec 7.2: 0.5)."""

  def __init__(self, p=0.5):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"RandomHorizontalFlip: p must lie in [0, 1], got {p}.")
    self.p = float(p)

  def random_map(self, record, rng):
    if rng.random() >= self.p:
      return record
    return {**record,
            "image": np.ascontiguousarray(record["image"][:, ::-1]),
            "mask": np.ascontiguousarray(record["mask"][:, ::-1])}


def grayscale(planes):
  """Luma of RGB `planes: [3, H, W] float32` -> [H, W] float32."""
  red, green, blue = planes
  gray = red * _LUMA_WEIGHTS[0]
  gray += green * _LUMA_WEIGHTS[1]
  gray += blue * _LUMA_WEIGHTS[2]
  return gray


# The colour ops below work on channel-first float32 planes `[3, H, W]` (0..255): numpy
# reductions and broadcasts over a trailing axis of size 3 are 10-50x slower than over
# contiguous planes. They work in place in as few image-sized arrays as possible, because
# allocating fresh temporaries costs more than the arithmetic.


def adjust_brightness(planes, factor):
  """Scales `planes: [3, H, W] float32` towards black by `factor`, clipped to 0..255."""
  out = planes * np.float32(factor)
  return np.clip(out, 0.0, 255.0, out=out)


def adjust_contrast(planes, factor):
  """Blends `planes: [3, H, W] float32` with its mean luma (a scalar) by `factor`."""
  mean = grayscale(planes).mean()
  out = planes * np.float32(factor)
  out += np.float32((1.0 - factor) * mean)
  return np.clip(out, 0.0, 255.0, out=out)


def adjust_saturation(planes, factor):
  """Blends `planes: [3, H, W] float32` with its per-pixel luma by `factor`, clipped."""
  gray = grayscale(planes)
  gray *= np.float32(1.0 - factor)
  out = planes * np.float32(factor)
  out += gray
  return np.clip(out, 0.0, 255.0, out=out)


def adjust_hue(planes, shift):
  """Rotates the HSV hue of `planes: [3, H, W] float32` (0..255) by `shift` turns.

  Saturation and value are kept exactly: value is the channel max and `max - min` the
  chroma, so channel n (5, 3, 1 for R, G, B) is rebuilt as
  `max - chroma * clip(min(k, 4 - k), 0, 1)` with `k = (n + 6 * hue) mod 6`.
  """
  red, green, blue = planes
  value = np.maximum(red, green)
  np.maximum(value, blue, out=value)
  chroma = np.minimum(red, green)
  np.minimum(chroma, blue, out=chroma)
  np.subtract(value, chroma, out=chroma)
  inverse_chroma = np.divide(1.0, chroma, out=np.zeros_like(chroma), where=chroma > 0)
  # Hue in sixths of a turn: 4 + (r - g) / c where blue is the max, 2 + (b - r) / c
  # where green is, (g - b) / c where red is (ties give the same hue either way).
  hue6 = red - green
  hue6 *= inverse_chroma
  hue6 += 4.0
  scratch = blue - red
  scratch *= inverse_chroma
  scratch += 2.0
  np.copyto(hue6, scratch, where=value == green)
  np.subtract(green, blue, out=scratch)
  scratch *= inverse_chroma
  np.copyto(hue6, scratch, where=value == red)
  hue6 += np.float32(6.0 * shift)
  out = np.empty_like(planes)
  for k, channel_offset in zip(out, (5.0, 3.0, 1.0)):
    np.add(hue6, channel_offset, out=k)
    np.multiply(k, np.float32(1.0 / 6.0), out=scratch)  # k mod 6 (np.mod is much slower)
    np.floor(scratch, out=scratch)
    scratch *= 6.0
    k -= scratch
    np.subtract(4.0, k, out=scratch)
    np.minimum(k, scratch, out=k)
    np.clip(k, 0.0, 1.0, out=k)
    k *= chroma
    np.subtract(value, k, out=k)
  return out


class ColorJitter(grain.transforms.RandomMap):
  """Random brightness, contrast, saturation and hue on the uint8 RGB image (spec 7.2).

  torchvision semantics: brightness/contrast/saturation factors are drawn from
  U[max(0, 1 - x), 1 + x], the hue shift from U[-hue, hue] turns (hue <= 0.5); the four
  ops run in a random order, each clipping to 0..255 as torchvision does. A parameter of 0
  disables its op. Unlike torchvision's uint8 path, the chain runs in float32 and is
  rounded to uint8 once at the end. The mask is unchanged.
  """

  def __init__(self, brightness, contrast, saturation, hue):
    for name, value in (("brightness", brightness), ("contrast", contrast),
                        ("saturation", saturation)):
      if value < 0:
        raise ValueError(f"ColorJitter: {name} must be >= 0, got {value}.")
    if not 0.0 <= hue <= 0.5:
      raise ValueError(f"ColorJitter: hue must lie in [0, 0.5], got {hue}.")
    # (op, low, high) of each enabled op; the amount is drawn from U[low, high].
    self.ops = [(op, max(0.0, 1.0 - strength), 1.0 + strength)
                for op, strength in ((adjust_brightness, brightness),
                                     (adjust_contrast, contrast),
                                     (adjust_saturation, saturation)) if strength > 0]
    if hue > 0:
      self.ops.append((adjust_hue, -hue, hue))

  def random_map(self, record, rng):
    if not self.ops:
      return record
    planes = record["image"].transpose(2, 0, 1).astype(np.float32)
    for op_index in rng.permutation(len(self.ops)):
      op, low, high = self.ops[op_index]
      planes = op(planes, rng.uniform(low, high))
    # Every op clips to 0..255, so rounding is the only step left before uint8.
    image = np.rint(planes, out=planes).astype(np.uint8).transpose(1, 2, 0)
    return {**record, "image": np.ascontiguousarray(image)}


def _crop_axis(length, size, rng):
  """(source start, canvas start, extent) of a random `size` window along one axis.

  A longer axis is cropped at a random offset; a shorter one is placed whole at a random
  offset inside the padded canvas.
  """
  if length >= size:
    return int(rng.integers(0, length - size, endpoint=True)), 0, size
  return 0, int(rng.integers(0, size - length, endpoint=True)), length


class RandomCrop(grain.transforms.RandomMap):
  """Random `size` x `size` crop, padding image 0 / mask 255 where smaller (spec 7.2).

  Adds `crop_box` int32 [4] = (top, left, bottom, right), exclusive ends: the region of
  the crop that holds image pixels.
  """

  def __init__(self, size):
    if size < 1:
      raise ValueError(f"RandomCrop: size must be >= 1, got {size}; check data.crop_size.")
    self.size = int(size)

  def random_map(self, record, rng):
    height, width = record["mask"].shape
    src_top, top, crop_height = _crop_axis(height, self.size, rng)
    src_left, left, crop_width = _crop_axis(width, self.size, rng)
    image = np.full((self.size, self.size, 3), IMAGE_PAD_VALUE, np.uint8)
    mask = np.full((self.size, self.size), MASK_PAD_VALUE, np.uint8)
    image[top:top + crop_height, left:left + crop_width] = record["image"][
        src_top:src_top + crop_height, src_left:src_left + crop_width]
    mask[top:top + crop_height, left:left + crop_width] = record["mask"][
        src_top:src_top + crop_height, src_left:src_left + crop_width]
    crop_box = np.array([top, left, top + crop_height, left + crop_width], np.int32)
    return {**record, "image": image, "mask": mask, "crop_box": crop_box}


class PadToSize(grain.transforms.Map):
  """Pads the full image bottom/right to `size` x `size` for evaluation (spec 8).

  Image padding is 0 and mask padding 255; `crop_box = (0, 0, h, w)`. Images larger than
  `size` are an error (evaluation never crops).
  """

  def __init__(self, size):
    if size < 1:
      raise ValueError(f"PadToSize: size must be >= 1, got {size}; check data.eval_size.")
    self.size = int(size)

  def map(self, record):
    height, width = record["mask"].shape
    if height > self.size or width > self.size:
      raise ValueError(
          f"PadToSize: record {record['id']!r} is {height}x{width} (HxW), larger than the "
          f"eval size {self.size}x{self.size}; set data.eval_size >= {max(height, width)}.")
    image = np.full((self.size, self.size, 3), IMAGE_PAD_VALUE, np.uint8)
    mask = np.full((self.size, self.size), MASK_PAD_VALUE, np.uint8)
    image[:height, :width] = record["image"]
    mask[:height, :width] = record["mask"]
    crop_box = np.array([0, 0, height, width], np.int32)
    return {**record, "image": image, "mask": mask, "crop_box": crop_box}


def train_transforms(data_config):
  """Train transforms from `data.{resize_range, hflip, color_jitter, crop_size}` (spec 7.2)."""
  transforms = []
  if data_config.resize_range is not None:
    transforms.append(RandomResizeLongSide(*data_config.resize_range))
  if data_config.hflip:
    transforms.append(RandomHorizontalFlip())
  if data_config.color_jitter is not None and any(data_config.color_jitter):  # all 0: off
    transforms.append(ColorJitter(*data_config.color_jitter))
  transforms.append(RandomCrop(data_config.crop_size))
  return transforms


def eval_transforms(data_config):
  """Eval transforms from `data.eval_size`: pad the whole image, never resize or crop."""
  return [PadToSize(data_config.eval_size)]
