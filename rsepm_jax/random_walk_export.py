"""Random-walk pseudo labels of the multi-stage pipeline (spec 9 step 2; components spec D.2).

Per image at its own size (the padded record cropped back to its `crop_box`):
  1. the single-stage seeds with the GT tags, `export.tagged_seeds` (multi-scale + flip over
     `config.inference`, each tagged class divided by its maximum, the others 0);
  2. `stride4_scores`: the seeds on the stride-4 grid ceil(H / 4) x ceil(W / 4), each cell the
     mean of its in-image pixels (area average), each class divided again by its maximum on the
     grid (+1e-5). A CAM-only network (`config.model.with_decoder=False`, Puzzle-CAM) gives
     IRNet's seeds instead, A.5's stride-4 `cam` (`inference.multiscale`'s "rw_cams": each
     view's CAMs bilinearly resized straight to that grid, summed), tagged classes only, each
     divided by its maximum (+1e-5). That map is not the area average of the full-resolution
     `hr_cam` when H or W is not a multiple of the CAM stride: `hr_cam` is cropped from
     stride * ceil(H / stride) pixels, `cam` stretches the CAM grid over the image;
  3. the boundary map of `affinity.edge_maps` (image and flip, zero-padded to `edge_size`);
  4. `random_walk.random_walk_labels` (radius, beta, 2^exp_times steps, constant background):
     0 background, c + 1 class c, at the image's size.
Steps 3-4 run one image per call: one compilation per image size (the multi-scale passes of
step 1 batch the images of one size). PNGs go to `out_dir/<id>.png`
(`export.write_missing_labels`: resumable, existing PNGs are skipped; each host its share).
"""
import contextlib

from absl import logging
from etils import epath
import jax
import numpy as np

from rsepm_jax import export
from rsepm_jax import inference
from rsepm_jax import metric_writer
from rsepm_jax import parallel
from rsepm_jax import train
from rsepm_jax.data import pipeline
from rsepm_jax.data import preflight
from rsepm_jax.data import records
from rsepm_jax.models import affinity
from rsepm_jax.refine import affinity_labels
from rsepm_jax.refine import random_walk

# One compilation per image size, radius and step count.
_random_walk_labels = jax.jit(random_walk.random_walk_labels,
                              static_argnames=("image_size", "radius", "exp_times"))
_label_crf = jax.jit(affinity_labels.label_crf, static_argnums=3)  # one per image size


def stride4_scores(seeds):
  """float32 `[ceil(H / 4), ceil(W / 4), C]` of seeds `[H, W, C]`: the mean of each 4 x 4 cell's
  in-image pixels, then each class divided by its maximum (+1e-5); absent classes stay 0."""
  seeds = np.asarray(seeds, np.float32)
  height, width, channels = seeds.shape
  stride = affinity.EDGE_STRIDE
  rows, cols = -(-height // stride), -(-width // stride)
  padded = np.zeros((rows * stride, cols * stride, channels + 1), np.float32)
  padded[:height, :width, :channels] = seeds
  padded[:height, :width, channels] = 1.0  # counts the in-image pixels of each cell
  sums = padded.reshape(rows, stride, cols, stride, channels + 1).sum(axis=(1, 3))
  scores = sums[..., :channels] / sums[..., channels:]
  return scores / (scores.max(axis=(0, 1)) + 1e-5)


def walk_seeds(model, variables, images, tags, settings):
  """float32 `[ceil(H_i / 4), ceil(W_i / 4), C]` seeds of the walk (module docstring, steps 1-2)
  of uint8 RGB `images [H_i, W_i, 3]` with GT `tags` (bool `[C]` each), by
  `inference.multiscale_many` with `config.inference` `settings`."""
  seeds = []
  for scores, image_tags in zip(inference.multiscale_config(model, variables, images, settings),
                                tags):
    if scores["rule"] == "cam":
      cams = scores["rw_cams"] * np.asarray(image_tags, np.float32)
      seeds.append(cams / (cams.max(axis=(0, 1)) + 1e-5))
    else:
      seeds.append(stride4_scores(export.tagged_seeds(scores, image_tags)))
  return seeds


def random_walk_label_maps(rsepm_model, rsepm_variables, affinity_model, affinity_variables,
                           images, tags, config, radius=5, beta=10.0, exp_times=8,
                           bg_threshold=0.25, edge_size=affinity.GET_EDGE_SIZE, crf_iters=0):
  """uint8 `[H_i, W_i]` random-walk labels (0 background, c + 1 class c) of uint8 RGB
  `images [H_i, W_i, 3]` with GT `tags` (bool `[C]` each); module docstring, steps 1-4;
  `crf_iters > 0`: then IRNet's label-mode dense CRF with that many iterations (Puzzle-CAM: 1)."""
  seeds = walk_seeds(rsepm_model, rsepm_variables, images, tags, config.inference)
  labels = []
  for image, image_seeds, image_tags in zip(images, seeds, tags):
    edge = affinity.get_edge(affinity_model, affinity_variables, image, edge_size)
    label = _random_walk_labels(image_seeds[None], edge[None],
                                image_size=tuple(image.shape[:2]), bg_threshold=bg_threshold,
                                radius=int(radius), beta=beta, exp_times=int(exp_times))
    if crf_iters:
      label = _label_crf(image[None], label, image_tags[None], crf_iters)
    labels.append(np.asarray(label, np.uint8)[0])
  return labels


def write_random_walk_labels(rsepm_model, rsepm_variables, affinity_model, affinity_variables,
                             config, batches, out_dir, progress=None, radius=5, beta=10.0,
                             exp_times=8, bg_threshold=0.25, edge_size=affinity.GET_EDGE_SIZE,
                             crf_iters=0):
  """(written, skipped as already written) over the valid records of host `batches`
  (`pipeline.eval_batches` dicts) by `export.write_missing_labels` and `random_walk_label_maps`;
  `progress` advances by `config.eval.global_batch_size` per batch."""
  def label_images(images, tags):
    return random_walk_label_maps(rsepm_model, rsepm_variables, affinity_model,
                                  affinity_variables, images, tags, config, radius, beta,
                                  exp_times, bg_threshold, edge_size, crf_iters)
  return export.write_missing_labels(batches, out_dir, label_images, progress,
                                     config.eval.global_batch_size)


@records.logs_bad_files
def export_random_walk(config, rsepm_workdir, affinity_config, affinity_workdir, out_dir,
                       split=None, rsepm_step=None, affinity_step=None, allow_config_change=False):
  """Writes the random-walk labels of `split` (default `config.export.split`) to `out_dir`;
  returns how many PNGs this host wrote.

  `config`: the single-stage RS+EPM run, with its decoder or CAM-only (its data,
  `config.inference` and the walk's `config.rw`: radius, beta, exp_times, bg_threshold,
  edge_size), restored from `rsepm_workdir`; `affinity_config` (`model.arch = "affinity"`): the
  boundary network, restored from `affinity_workdir`. Steps default to the latest checkpoints;
  `allow_config_change`: see `train.restore_for_inference`.
  """
  split = split or config.export.split
  if config.model.arch != "rsepm":
    raise ValueError("export_random_walk: the seeds come from the single-stage network, with its "
                     "decoder or CAM-only (config.model.arch='rsepm'), got "
                     f"arch={config.model.arch!r}.")
  if affinity_config.model.arch != affinity.ARCH:
    raise ValueError(f"export_random_walk: affinity_config.model.arch must be {affinity.ARCH!r} "
                     f"(the boundary network), got {affinity_config.model.arch!r}.")
  mesh = parallel.make_mesh()
  rsepm_model, rsepm_variables, rsepm_step = train.restore_for_inference(
      config, rsepm_workdir, mesh, rsepm_step, allow_config_change)
  affinity_model, affinity_variables, affinity_step = train.restore_for_inference(
      affinity_config, affinity_workdir, mesh, affinity_step, allow_config_change,
      reads_data=False)
  preflight.check_splits(config.data, evaluated=(split,))
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  progress = metric_writer.CountProgress(f"random walk {split}",
                                         pipeline.num_records(config.data, split))
  batches = iter(pipeline.eval_batches(config.data, split, config.eval.global_batch_size))
  with contextlib.closing(batches):  # grain's read threads stop even when an image fails
    written, skipped = write_random_walk_labels(
        rsepm_model, rsepm_variables, affinity_model, affinity_variables, config, batches,
        out_dir, progress, radius=config.rw.radius, beta=config.rw.beta,
        exp_times=config.rw.exp_times, bg_threshold=config.rw.bg_threshold,
        edge_size=config.rw.edge_size, crf_iters=config.rw.crf_iters)
  logging.info("Wrote %d random-walk label PNGs of split %r (first-stage step %d, AffinityNet "
               "step %d; skipped %d already written) to %s.", written, split, rsepm_step,
               affinity_step, skipped, out_dir)
  return written
