"""EdgePredictMix and the baseline mixes of a training batch (spec 5.2, a reconstruction).

The baselines: CutMix and ClassMix (below), Saliency Grafting (`saliency_grafting.py`) and CDA
(`context_decoupling.py`), which give this module their paste masks (CDA: and the moved partner).

Every choice is a field of `MixSettings`. For every image i of a batch and its partner j (a random permutation of the batch):

    edges_j     = thresholded probability difference between 4-neighbours of P_j (spec 5.2
                  step 1), or the Canny edges of x_j, or both
    completed   = seed with the uncertain pixels of every edge-bounded region set to the
                  region's majority certain label; background on edges -> ignore (step 2);
                  EPM completes the seeds of both images
    M_j         = completed_j in the selected foreground classes (EPM), seed_j in a random half
                  of its classes (ClassMix), or a random rectangle (CutMix)
    x_mix = M_j ? x_j : x_i        seed_mix = M_j ? completed_j : completed_i   (step 3;
                  CutMix / ClassMix, or `mix_targets="seeds"`: the seeds as they are)
                  EPM: 255 on the edges of j inside M_j or touching it (`edge_band`)
    y_mix = y_i | classes pasted from j

Everything runs under `stop_gradient`; nothing here has parameters. Seeds and probabilities live
on the mask grid (h, w); images on the input grid (H, W) = stride * (h, w).
"""
import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp

from rsepm_jax import image_ops
from rsepm_jax.refine import canny as canny_lib
from rsepm_jax.refine import components
from rsepm_jax.refine import context_decoupling
from rsepm_jax.refine import saliency_grafting

IGNORE = 255
_KINDS = ("epm", "cutmix", "classmix", "saliency_grafting", "cda")
# Kinds that read the CAMs `[B, hc, wc, C]` of both images (a "cams" entry of the batches).
CAM_KINDS = ("saliency_grafting",)
_LABEL_MIXINGS = ("calibrated", "union")
_CDA_INSTANCES = ("class", "component")
_EDGE_SOURCES = ("probability", "canny", "both")
_CLASS_SUBSETS = ("all", "half")
_MIX_TARGETS = ("completed", "seeds")
_EDGE_BANDS = ("pasted_edges", "label_change")
# OpenCV's uint8 RGB -> gray: 0.299 R + 0.587 G + 0.114 B in Q14 fixed point, rounded half up.
_GRAY_WEIGHTS_Q14 = (4899, 9617, 1868)
_GRAY_SHIFT = 14


@dataclasses.dataclass(frozen=True)
class MixSettings:
  """Static mixing knobs (spec 5.2); the defaults are the spec's proposal."""
  kind: str = "epm"  # epm | cutmix | classmix | saliency_grafting | cda
  edge_source: str = "probability"  # EPM edges: probability | canny | both (their OR)
  edge_low_th: float = 0.10  # thresholding: median over the edge values >= low_th ...
  edge_sigma: float = 0.25  # ... edge = value >= min(1, (1 + sigma) * median)
  canny_low: float = 10.0  # Canny hysteresis thresholds on the uint8 grey image
  canny_high: float = 100.0
  canny_blur: int = 5  # Gaussian pre-blur size of `cv2.GaussianBlur((k, k), 0)`
  fill_regions: bool = True  # EPM: complete the seed inside edge-bounded regions (step 2)
  class_subset: str = "all"  # EPM: all | half of the partner's classes (ClassMix always half)
  # EPM: what is mixed: the completed seeds of both images (spec 5.2 step 2) | the seeds as
  # they are (completion then only shapes M).
  mix_targets: str = "completed"
  ignore_edge_band: bool = True  # EPM: set an edge band around the pasted mask to ignore
  # EPM band: edges of j inside M_j or touching it (spec 5.2 step 3) | label_change: edges of j
  # in the 3x3 ring across the boundary of M_j where the two mixed labels differ.
  edge_band: str = "pasted_edges"
  drop_covered_classes: bool = False  # drop a class of i whose seed is entirely covered
  # Saliency Grafting (`saliency_grafting.py`, a reconstruction):
  sg_temperature: float = 0.2  # softmax temperature of the saliency over the cells; 0: max-norm
  sg_threshold: float = 1.0  # candidate cells: saliency > threshold * its mean over the image
  sg_patch: int = 4  # side of the patches kept or dropped together, in seed cells
  sg_keep_prob: float = 0.5  # Bernoulli probability of keeping a patch of candidates
  sg_label_mixing: str = "calibrated"  # calibrated: y_i + lambda (y_j - y_i) | union: y_i | pasted
  # CDA (`context_decoupling.py`, a reconstruction):
  cda_instances: str = "component"  # the pasted object: all of a class | its largest component
  cda_translate: bool = True  # move the object to a random place (False: paste it in place)

  def __post_init__(self):
    for name, allowed in (("kind", _KINDS), ("edge_source", _EDGE_SOURCES),
                          ("class_subset", _CLASS_SUBSETS), ("mix_targets", _MIX_TARGETS),
                          ("edge_band", _EDGE_BANDS), ("sg_label_mixing", _LABEL_MIXINGS),
                          ("cda_instances", _CDA_INSTANCES)):
      if getattr(self, name) not in allowed:
        raise ValueError(
            f"MixSettings.{name}={getattr(self, name)!r}; expected one of {allowed}.")
    for name, ok, expected in (
        ("sg_temperature", self.sg_temperature >= 0, ">= 0"),
        ("sg_threshold", self.sg_threshold > 0, "> 0"),
        ("sg_patch", self.sg_patch >= 1, ">= 1"),
        ("sg_keep_prob", 0 < self.sg_keep_prob <= 1, "in (0, 1]")):
      if not ok:
        raise ValueError(f"MixSettings.{name}={getattr(self, name)!r}; expected {expected}.")


def probability_edges(probs):
  """Probability difference to the 4-neighbours (spec 5.2 step 1).

  E(x) = 0.5 * max over the 4-neighbours x' of ||P(x) - P(x')||_1, clipped to 1 (RecurSeed's P
  is not normalised per pixel). Neighbours outside the image contribute 0.

  Args:
    probs: [B, h, w, K] per-pixel class probabilities.

  Returns:
    float32 [B, h, w] in [0, 1].
  """
  # The L1 norm is summed plane by plane: XLA:CPU reduces a short minor axis about 5x slower.
  planes = [probs[..., k].astype(jnp.float32) for k in range(probs.shape[-1])]
  right = sum(jnp.abs(plane[:, :, 1:] - plane[:, :, :-1]) for plane in planes)  # [B, h, w - 1]
  down = sum(jnp.abs(plane[:, 1:] - plane[:, :-1]) for plane in planes)  # [B, h - 1, w]
  no_pad = (0, 0)
  largest = functools.reduce(jnp.maximum, (
      jnp.pad(right, (no_pad, no_pad, (0, 1))), jnp.pad(right, (no_pad, no_pad, (1, 0))),
      jnp.pad(down, (no_pad, (0, 1), no_pad)), jnp.pad(down, (no_pad, (1, 0), no_pad))))
  return jnp.minimum(0.5 * largest, 1.0)


def threshold_edges(edge_map, low_th=0.10, sigma=0.25):
  """Adaptive binarisation of a soft edge map, per image (spec 5.1 `thresholding`).

  v = median of the values >= `low_th`; edges = value >= min(1, (1 + sigma) * v). An image with
  no value >= `low_th` has no edges. Works on the [0, 1] map directly (the original quantises
  255 * E to uint8 first).

  Args:
    edge_map: [B, h, w] float in [0, 1].
    low_th, sigma: see above.

  Returns:
    bool [B, h, w].
  """
  flat = edge_map.reshape(edge_map.shape[0], -1).astype(jnp.float32)
  candidate = flat >= low_th
  median = jnp.nanmedian(jnp.where(candidate, flat, jnp.nan), axis=1)
  upper = jnp.minimum(1.0, (1.0 + sigma) * median)
  edges = candidate.any(axis=1, keepdims=True) & (flat >= upper[:, None])
  return edges.reshape(edge_map.shape)


def _opencv_gray(image):
  """Normalised RGB `[B, H, W, 3]` -> the uint8 grey levels of OpenCV's `cvtColor`, as float32."""
  rgb = jnp.clip(jnp.round(image_ops.denormalize(image.astype(jnp.float32))), 0, 255)
  weighted = jnp.sum(rgb.astype(jnp.int32) * jnp.asarray(_GRAY_WEIGHTS_Q14, jnp.int32), axis=-1)
  return ((weighted + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT).astype(jnp.float32)


def image_edges(image, size, settings):
  """Canny edges of the image pooled onto the mask grid (spec 5.1 `get_edge`, 5.2 step 1).

  Args:
    image: [B, H, W, 3] float32, ImageNet-normalised RGB.
    size: (h, w) mask grid; H and W must be multiples of h and w.
    settings: `MixSettings` (canny_low, canny_high, canny_blur).

  Returns:
    bool [B, h, w]: True where any pixel of the block is a Canny edge.
  """
  batch, height, width = image.shape[:3]
  if height % size[0] or width % size[1]:
    raise ValueError(f"image_edges: image size {(height, width)} is not a multiple of the mask "
                     f"size {tuple(size)}.")
  edges = canny_lib.canny(_opencv_gray(image), settings.canny_low, settings.canny_high,
                          settings.canny_blur)
  blocks = edges.reshape(batch, size[0], height // size[0], size[1], width // size[1])
  return blocks.any(axis=(2, 4))


def predicted_edges(probs, image, settings):
  """Binary edges on the mask grid from `settings.edge_source` (spec 5.2 step 1).

  Args:
    probs: [B, h, w, C + 1] refined probabilities, background first.
    image: [B, H, W, 3] float32 normalised images (used by the Canny sources).
    settings: `MixSettings`.

  Returns:
    bool [B, h, w].
  """
  edges = []
  if settings.edge_source in ("probability", "both"):
    edges.append(threshold_edges(probability_edges(probs), settings.edge_low_th,
                                 settings.edge_sigma))
  if settings.edge_source in ("canny", "both"):
    edges.append(image_edges(image, probs.shape[1:3], settings))
  return functools.reduce(jnp.logical_or, edges)


def fill_regions(seed, edges, num_classes, valid=None):
  """Edge-bounded completion of a seed (spec 5.1 `get_CCL`, 5.2 step 2).

  The non-edge (valid) pixels are split into 4-connected regions. Inside every region the
  ignored pixels take the majority certain label (0..C; ties go to the smaller label); a region
  without certain pixels is left as it is. Edge pixels labelled background become ignore; edge
  pixels with a class keep it.

  Args:
    seed: int [B, h, w]; 0 background, c + 1 class c, 255 ignore.
    edges: bool [B, h, w].
    num_classes: C, the number of foreground classes (static).
    valid: optional bool [B, h, w]; pixels outside (the crop padding) belong to no region.

  Returns:
    int32 [B, h, w].
  """
  seed = seed.astype(jnp.int32)
  batch, height, width = seed.shape
  num_labels = num_classes + 1
  regions = ~edges if valid is None else ~edges & valid
  region_id = components.label(regions, connectivity=4).reshape(batch, -1)  # 0..h*w
  flat_seed = seed.reshape(batch, -1)
  certain = (region_id > 0) & (flat_seed != IGNORE)
  # One histogram of (region, label) pairs per image; uncounted pixels add 0 to bin 0.
  pair = jnp.where(certain, region_id * num_labels + flat_seed, 0)
  counts = jnp.zeros((batch, (height * width + 1) * num_labels), jnp.int32)
  counts = counts.at[jnp.arange(batch)[:, None], pair].add(certain.astype(jnp.int32))
  counts = counts.reshape(batch, height * width + 1, num_labels)
  majority = jnp.take_along_axis(jnp.argmax(counts, axis=-1), region_id, axis=1)
  has_certain = jnp.take_along_axis(jnp.any(counts > 0, axis=-1), region_id, axis=1)
  fill = (flat_seed == IGNORE) & (region_id > 0) & has_certain
  completed = jnp.where(fill, majority, flat_seed).reshape(seed.shape)
  return jnp.where(edges & (completed == 0), IGNORE, completed).astype(jnp.int32)


def _class_presence(seed, num_classes, where=None):
  """bool [B, C]: class c has a pixel c + 1 in `seed [B, h, w]` (inside `where`, if given)."""
  batch = seed.shape[0]
  counted = jnp.ones(seed.shape, jnp.int32) if where is None else where.astype(jnp.int32)
  # A histogram over all label values 0..255, so ignore pixels need no special case.
  histogram = jnp.zeros((batch, IGNORE + 1), jnp.int32).at[
      jnp.arange(batch)[:, None], seed.reshape(batch, -1)].add(counted.reshape(batch, -1))
  return histogram[:, 1:num_classes + 1] > 0


def _pixels_of_classes(seed, classes):
  """bool [B, h, w]: pixels of `seed` whose label c + 1 has `classes[b, c]` set."""
  batch, num_classes = classes.shape
  # Look-up table over all label values 0..255: only the selected class labels are True.
  table = jnp.zeros((batch, IGNORE + 1), bool).at[:, 1:num_classes + 1].set(classes)
  return jnp.take_along_axis(table, seed.reshape(batch, -1), axis=1).reshape(seed.shape)


def _random_half(keys, present):
  """A random ceil(n / 2) of the n present classes of each image: bool [B, C], key per image."""
  draws = jax.vmap(lambda key: jax.random.uniform(key, present.shape[1:]))(keys)
  scores = jnp.where(present, draws, 2.0)
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  count = jnp.sum(present, axis=1, keepdims=True)
  return present & (rank < (count + 1) // 2)


def _random_rectangles(keys, size):
  """CutMix boxes on the `size` grid: area ratio ~ U(0, 1), uniform position inside; [B, h, w]."""
  def one_box(key):
    ratio_key, top_key, left_key = jax.random.split(key, 3)
    side = jnp.sqrt(jax.random.uniform(ratio_key))
    box_height = jnp.round(side * size[0]).astype(jnp.int32)
    box_width = jnp.round(side * size[1]).astype(jnp.int32)
    top = jax.random.randint(top_key, (), 0, size[0] - box_height + 1)
    left = jax.random.randint(left_key, (), 0, size[1] - box_width + 1)
    return jnp.stack([top, left, top + box_height, left + box_width])
  return image_ops.box_mask(jax.vmap(one_box)(keys), size)


def _dilate(mask):
  """bool [B, h, w]: `mask` grown by its 8-neighbours."""
  return lax.reduce_window(mask.astype(jnp.int32), 0, lax.max, (1, 3, 3), (1, 1, 1), "SAME") > 0


def _boundary_band(mask):
  """bool [B, h, w]: pixels whose 3x3 neighbourhood holds both mask and non-mask pixels.

  Outside the image counts as neither, so the image border is no boundary.
  """
  as_int = mask.astype(jnp.int32)
  window, strides = (1, 3, 3), (1, 1, 1)
  dilated = lax.reduce_window(as_int, 0, lax.max, window, strides, "SAME")
  eroded = lax.reduce_window(as_int, 1, lax.min, window, strides, "SAME")
  return dilated != eroded


def _check_shapes(images, seeds, probs, labels, crop_box, cams=None):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"mix: images must be [B, H, W, 3], got {images.shape}.")
  batch, height, width = images.shape[:3]
  if seeds.ndim != 3 or seeds.shape[0] != batch:
    raise ValueError(f"mix: seeds must be [B={batch}, h, w], got {seeds.shape}.")
  if height % seeds.shape[1] or width % seeds.shape[2]:
    raise ValueError(f"mix: image size {(height, width)} is not a multiple of the seed size "
                     f"{seeds.shape[1:]}.")
  if probs.shape[:3] != seeds.shape or probs.ndim != 4:
    raise ValueError(f"mix: probs must be [B, h, w, C + 1] on the seed grid {seeds.shape}, got "
                     f"{probs.shape}.")
  if labels.shape != (batch, probs.shape[-1] - 1):
    raise ValueError(f"mix: labels must be [B, C] = {(batch, probs.shape[-1] - 1)} (C from probs), "
                     f"got {labels.shape}.")
  if crop_box.shape != (batch, 4):
    raise ValueError(f"mix: crop_box must be [B={batch}, 4], got {crop_box.shape}.")
  if cams is not None and (cams.ndim != 4 or cams.shape[0] != batch
                           or cams.shape[-1] != labels.shape[1]):
    raise ValueError(f"mix: cams must be [B={batch}, hc, wc, C={labels.shape[1]}], got "
                     f"{cams.shape}.")


BATCH_FIELDS = ("images", "seeds", "probs", "labels", "crop_box")


def mix_pairs(keys, target, partner, settings):
  """Mixes row i of `partner` into row i of `target` (spec 5.2 step 3).

  Args:
    keys: [B] PRNG keys, one per target image (class subsets, rectangles), so results do not
      depend on how a global batch is split over devices.
    target, partner: dicts of aligned batches with
      images: [B, H, W, 3] float32 normalised images,
      seeds: int [B, h, w] RecurSeed seeds (0 background, c + 1 class c, 255 ignore),
      probs: [B, h, w, C + 1] refined probabilities, background first (EPM edges),
      labels: [B, C] multi-hot tags,
      crop_box: int [B, 4] valid region (top, left, bottom, right) in image pixels,
      cams: [B, hc, wc, C] raw CAMs (only for the `CAM_KINDS`).
    settings: `MixSettings` (static).

  Returns:
    dict with `images [B, H, W, 3]`, `seeds int32 [B, h, w]`, `labels [B, C]` (dtype of the
    input; float32 for Saliency Grafting's calibrated labels), `crop_box int32 [B, 4]` (union of
    both boxes; CDA: the partner's moved with its object) and `paste_mask bool [B, h, w]` (M_j:
    the pixels that come from the partner).
  """
  fields = BATCH_FIELDS + (("cams",) if settings.kind in CAM_KINDS else ())
  for batch in (target, partner):
    missing = [name for name in fields if name not in batch]
    if missing:
      raise ValueError(f"mix: kind {settings.kind!r} needs the batch fields {missing} "
                       f"(expected {fields}).")
    _check_shapes(*(batch[name] for name in fields))
  target, partner = (
      {name: lax.stop_gradient(batch[name]) for name in fields} for batch in (target, partner))
  seeds, partner_seeds = (b["seeds"].astype(jnp.int32) for b in (target, partner))
  crop_box, partner_box = (b["crop_box"].astype(jnp.int32) for b in (target, partner))
  images, labels = target["images"], target["labels"]
  partner_images = partner["images"]
  height, width = images.shape[1:3]
  mask_size = seeds.shape[1:]
  num_classes = target["probs"].shape[-1] - 1

  def valid_cells(box):
    return image_ops.box_mask(image_ops.scale_box(box, height // mask_size[0]), mask_size)

  def edges_and_completion(batch, batch_seeds, box):
    edges = predicted_edges(batch["probs"], batch["images"], settings)
    if not settings.fill_regions:
      return edges, batch_seeds
    return edges, fill_regions(batch_seeds, edges, num_classes, valid_cells(box))

  # What the partner pastes: its region seeds and paste mask.
  if settings.kind == "cda":  # the partner moves with its object
    paste, moved = context_decoupling.paste_object(
        keys, {"images": partner_images, "seeds": partner_seeds, "crop_box": partner_box},
        _class_presence(partner_seeds, num_classes),
        image_ops.scale_box(crop_box, height // mask_size[0]), settings)
    partner_images, partner_seeds, partner_box = moved["images"], moved["seeds"], moved["crop_box"]
  region_seeds = partner_seeds
  edges = None
  if settings.kind == "cutmix":
    paste = _random_rectangles(keys, mask_size)
  elif settings.kind == "saliency_grafting":
    target_saliency, partner_saliency = (
        saliency_grafting.saliency(b["cams"], b["labels"], valid_cells(box),
                                   settings.sg_temperature)
        for b, box in ((target, crop_box), (partner, partner_box)))
    paste = saliency_grafting.graft_mask(keys, partner_saliency, valid_cells(partner_box),
                                         settings)
  elif settings.kind in ("epm", "classmix"):
    if settings.kind == "epm":
      edges, region_seeds = edges_and_completion(partner, partner_seeds, partner_box)
    present = _class_presence(region_seeds, num_classes)
    half = settings.kind == "classmix" or settings.class_subset == "half"
    selected = _random_half(keys, present) if half else present
    paste = _pixels_of_classes(region_seeds, selected)

  # The mixed targets: EPM's completed seeds of both images, or the seeds as they are.
  if edges is not None and settings.mix_targets == "completed":
    pasted_seeds, base_seeds = region_seeds, edges_and_completion(target, seeds, crop_box)[1]
  else:
    pasted_seeds, base_seeds = partner_seeds, seeds
  mixed_seeds = jnp.where(paste, pasted_seeds, base_seeds)
  if edges is not None and settings.ignore_edge_band:
    if settings.edge_band == "pasted_edges":
      band = edges & _dilate(paste)
    else:
      band = edges & _boundary_band(paste) & (pasted_seeds != base_seeds)
    mixed_seeds = jnp.where(band, IGNORE, mixed_seeds)

  # Tags: the classes pasted (before the edge band, which hides no image content).
  tags = labels > 0
  pasted = _class_presence(region_seeds, num_classes, paste)
  if settings.drop_covered_classes:
    had = _class_presence(base_seeds, num_classes)
    visible = _class_presence(base_seeds, num_classes, ~paste)
    tags &= ~(had & ~visible)
  mixed_labels = (tags | pasted).astype(labels.dtype)
  if settings.kind == "saliency_grafting" and settings.sg_label_mixing == "calibrated":
    lam = saliency_grafting.calibrated_lambda(target_saliency, partner_saliency, paste)
    partner_labels = jnp.maximum(partner["labels"].astype(jnp.float32), pasted)
    mixed_labels = saliency_grafting.calibrated_labels(labels, partner_labels, lam)

  paste_pixels = image_ops.resize_nearest(paste, (height, width))[..., None]
  mixed_images = jnp.where(paste_pixels, partner_images, images)
  mixed_box = jnp.concatenate([jnp.minimum(crop_box[:, :2], partner_box[:, :2]),
                               jnp.maximum(crop_box[:, 2:], partner_box[:, 2:])], axis=1)
  return {"images": mixed_images, "seeds": mixed_seeds, "labels": mixed_labels,
          "crop_box": mixed_box, "paste_mask": paste}


def mix_with_partner(partner, rng, images, seeds, probs, labels, crop_box, settings, cams=None):
  """Mixes every image i with image `partner[i]` = j of the same batch (spec 5.2 step 3).

  Args as in `mix_pairs` (the batch fields given separately; `cams` only for the `CAM_KINDS`),
  plus `partner int [B]` (a permutation; identity mixes nothing) and `rng`, split into one key
  per image. Returns `mix_pairs`' dict plus `partner int32 [B]`.
  """
  partner = partner.astype(jnp.int32)
  target = dict(zip(BATCH_FIELDS, (images, seeds, probs, labels, crop_box)))
  if cams is not None:
    target["cams"] = cams
  keys = jax.random.split(rng, images.shape[0])
  mixed = mix_pairs(keys, target, {k: v[partner] for k, v in target.items()}, settings)
  return {**mixed, "partner": partner}


def mix_batch(rng, images, seeds, probs, labels, crop_box, settings, cams=None):
  """`settings.kind`'s mix of a batch with a random permutation of itself (spec 5.2).

  Args and returns as in `mix_with_partner`; `rng` draws the partner permutation as well.
  """
  partner_key, mix_key = jax.random.split(rng)
  partner = jax.random.permutation(partner_key, images.shape[0])
  return mix_with_partner(partner, mix_key, images, seeds, probs, labels, crop_box, settings,
                          cams)
