r"""Writes COCO 2014 class-index masks from the instance annotations (data_and_users.md 6.2).

    python -m rsepm_jax.data.prepare_coco --root=/data/coco --split=train2014

reads `root/annotations/instances_<split>.json` and writes one palette PNG per annotated image
to `root/masks/<split>/<image name>.png`, the layout `coco.COCOSource` reads.

Rules (pinned; the published WSSS masks do not document theirs):
* Values: 0 background, 1..80 the categories in the standard order
  (`classes.COCO_CATEGORY_TO_CLASS_ID`), 255 ignore.
* Overlaps: instances are painted from the largest to the smallest pixel area, so the smaller
  object wins where instances overlap (equal areas: the higher annotation id wins).
* Crowd regions (`iscrowd=1`) are 255, except where a non-crowd instance covers them.
* Images without any annotation get no mask and so are not part of the split (82,081 train /
  40,137 val images remain). Images whose annotations are all crowd (or rasterise to no pixel)
  get a mask without foreground: their tag list is empty, a bad record for `COCOSource`; they
  are counted and named in the log.

Rasterisers (`--rasterizer`):
* `pycocotools` (default): `frPyObjects` + `decode`, the `annToMask` rasterisation the
  published masks were made with. pycocotools is an optional dependency, imported only here.
* `numpy`: no dependency. A polygon covers the pixels whose centre lies inside it (even-odd
  rule); uncompressed RLE (the crowd format of the 2014 JSON) decodes exactly. On random
  polygons 1-2% of the covered pixels differ from pycocotools, all on the boundary, with no
  size bias. Compressed (string) RLE still needs pycocotools.
"""
import argparse
import concurrent.futures
import io
import json
import sys

from absl import logging
from etils import epath
import numpy as np
from PIL import Image

from rsepm_jax.data import classes
from rsepm_jax.data import records

RASTERIZERS = ("pycocotools", "numpy")
_MAX_NAMED = 5


def _pycocotools_mask():
  try:
    from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "pycocotools is needed for --rasterizer=pycocotools and for compressed RLE "
        "segmentations: `pip install pycocotools`, or use --rasterizer=numpy "
        "(polygons and uncompressed RLE only).") from error
  return mask_utils


def rasterize_polygon(polygon, height, width):
  """Pixels whose centre (x + 0.5, y + 0.5) is inside `polygon` (even-odd rule): bool [H, W].

  `polygon` is COCO's flat [x0, y0, x1, y1, ...] in pixel-edge coordinates. Works row by row
  inside the polygon's bounding box: a pixel is inside when an odd number of edge crossings of
  its row's centre line lie right of its centre.
  """
  pixels = np.zeros((height, width), bool)
  xy = np.asarray(polygon, np.float64).reshape(-1, 2)
  if len(xy) < 3:
    return pixels
  row_start = max(0, int(np.floor(xy[:, 1].min() - 0.5)))
  row_stop = min(height, int(np.ceil(xy[:, 1].max() + 0.5)))
  col_start = max(0, int(np.floor(xy[:, 0].min() - 0.5)))
  col_stop = min(width, int(np.ceil(xy[:, 0].max() + 0.5)))
  if row_start >= row_stop or col_start >= col_stop:
    return pixels
  x0, y0 = xy[:, 0], xy[:, 1]
  x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
  centre_y = np.arange(row_start, row_stop, dtype=np.float64)[:, None] + 0.5
  crosses = (y0 > centre_y) != (y1 > centre_y)  # [rows, E]: edge crosses the row's centre line.
  safe_dy = np.where(y1 != y0, y1 - y0, 1.0)
  crossing_x = np.where(crosses, x0 + (centre_y - y0) * (x1 - x0) / safe_dy, 0.0)
  # Columns whose centre lies left of a crossing at x: [0, ceil(x - 0.5)).
  num_cols = col_stop - col_start
  crossing_end = np.clip(np.ceil(crossing_x - 0.5) - col_start, 0, num_cols).astype(np.int64)
  rows, edges = np.nonzero(crosses)
  ends_per_row = np.bincount(rows * (num_cols + 1) + crossing_end[rows, edges],
                             minlength=len(centre_y) * (num_cols + 1))
  ends_per_row = ends_per_row.reshape(len(centre_y), num_cols + 1)
  # Crossings right of column c = all crossings of the row - those ending at or before c.
  crossings_right = ends_per_row.sum(1, keepdims=True) - np.cumsum(ends_per_row, axis=1)
  pixels[row_start:row_stop, col_start:col_stop] = crossings_right[:, :num_cols] % 2 == 1
  return pixels


def decode_uncompressed_rle(rle, height, width):
  """COCO uncompressed RLE (column-major run lengths, background first) -> bool [H, W]."""
  counts = np.asarray(rle["counts"], np.int64)
  if tuple(rle["size"]) != (height, width) or counts.sum() != height * width:
    raise ValueError(f"RLE of size {rle['size']} with {counts.sum()} pixels does not match the "
                     f"image size ({height}, {width})")
  runs = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
  return runs.reshape(width, height).T


def annotation_pixels(annotation, height, width, *, rasterizer):
  """The pixels of one COCO annotation: bool [H, W]."""
  segmentation = annotation["segmentation"]
  compressed = isinstance(segmentation, dict) and isinstance(segmentation["counts"], str)
  if rasterizer == "pycocotools" or compressed:
    mask_utils = _pycocotools_mask()
    rles = mask_utils.frPyObjects(segmentation, height, width)
    rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
    return mask_utils.decode(rle).astype(bool)
  if isinstance(segmentation, dict):
    return decode_uncompressed_rle(segmentation, height, width)
  pixels = np.zeros((height, width), bool)
  for polygon in segmentation:
    pixels |= rasterize_polygon(polygon, height, width)
  return pixels


def semantic_mask(annotations, height, width, *, rasterizer):
  """Class-index mask of one image under the module's rules: uint8 [H, W]."""
  mask = np.zeros((height, width), np.uint8)
  instances = []
  for annotation in annotations:
    class_id = classes.COCO_CATEGORY_TO_CLASS_ID.get(annotation["category_id"])
    if class_id is None:
      raise ValueError(f"Annotation {annotation['id']} has unknown category_id "
                       f"{annotation['category_id']}.")
    try:
      pixels = annotation_pixels(annotation, height, width, rasterizer=rasterizer)
    except ValueError as error:
      raise ValueError(f"Annotation {annotation['id']}: {error}") from error
    if annotation.get("iscrowd", 0):
      mask[pixels] = records.IGNORE_INDEX
    else:
      instances.append((int(pixels.sum()), annotation["id"], class_id, pixels))
  for _, _, class_id, pixels in sorted(instances, key=lambda item: (-item[0], item[1])):
    mask[pixels] = class_id
  return mask


def encode_palette_png(mask):
  """uint8 [H, W] class indices -> palette PNG bytes (VOC colours; read back as indices)."""
  image = Image.fromarray(mask)
  image.putpalette(classes.color_palette().reshape(-1).tolist())  # 'L' -> 'P', same indices.
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def prepare_masks(root, split, *, mask_dir="masks", rasterizer="pycocotools", num_threads=8):
  """Writes the masks of `split`; returns counts {"written", "skipped_unannotated", "empty"}."""
  if rasterizer not in RASTERIZERS:
    raise ValueError(f"Unknown rasterizer {rasterizer!r}; expected one of {RASTERIZERS}.")
  if rasterizer == "pycocotools":
    _pycocotools_mask()  # Fails before the long JSON load when it is missing.
  root = epath.Path(root)
  annotation_path = root / "annotations" / f"instances_{split}.json"
  logging.info("Reading %s", annotation_path)
  instances = json.loads(annotation_path.read_text())
  annotations_by_image = {}
  for annotation in instances["annotations"]:
    annotations_by_image.setdefault(annotation["image_id"], []).append(annotation)
  images = [image for image in instances["images"] if image["id"] in annotations_by_image]
  out_dir = root / mask_dir / split
  out_dir.mkdir(parents=True, exist_ok=True)

  def write_mask(image):
    mask = semantic_mask(annotations_by_image[image["id"]], image["height"], image["width"],
                         rasterizer=rasterizer)
    name = epath.Path(image["file_name"]).stem
    (out_dir / f"{name}.png").write_bytes(encode_palette_png(mask))
    has_foreground = bool(((mask != 0) & (mask != records.IGNORE_INDEX)).any())
    return name, has_foreground

  with concurrent.futures.ThreadPoolExecutor(num_threads) as executor:
    written = list(executor.map(write_mask, images))
  empty = sorted(name for name, has_foreground in written if not has_foreground)
  summary = {"written": len(written),
             "skipped_unannotated": len(instances["images"]) - len(images),
             "empty": len(empty)}
  logging.info("COCO %s: wrote %d masks to %s (%s rasteriser); skipped %d images without "
               "annotations.", split, summary["written"], out_dir, rasterizer,
               summary["skipped_unannotated"])
  if empty:
    logging.warning("COCO %s: %d masks have no foreground class (all-crowd annotations), so "
                    "their tag lists are empty: %s%s", split, len(empty),
                    ", ".join(empty[:_MAX_NAMED]), ", ..." if len(empty) > _MAX_NAMED else "")
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="COCO root with annotations/ and <split>/.")
  parser.add_argument("--split", required=True, help="train2014 or val2014.")
  parser.add_argument("--mask_dir", default="masks", help="Masks go to <root>/<mask_dir>/<split>.")
  parser.add_argument("--rasterizer", default="pycocotools", choices=RASTERIZERS)
  parser.add_argument("--num_threads", type=int, default=8)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  prepare_masks(args.root, args.split, mask_dir=args.mask_dir, rasterizer=args.rasterizer,
                num_threads=args.num_threads)


if __name__ == "__main__":
  main(sys.argv[1:])
