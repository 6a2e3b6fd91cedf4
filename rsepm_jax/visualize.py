"""Training pictures for TensorBoard: inputs, their CAMs, RecurSeed seeds and the mixed batch.

`TrainingPictures.write` re-runs the training pass of `train_step.make_loss_fns` (forward,
RecurSeed seeds, `train_step.mix_across_devices`) on a training batch with the current weights,
in one jitted function compiled once: the phases are traced from the state's step as in the
train step, so turning RecurSeed or mixing on recompiles nothing. It runs on the whole sharded
global batch (BatchNorm sees the batch the step sees) and only the first `num_images` pictures
leave the devices. Tags written (each a strip of `num_images` pictures of the crop size):
  train/input        the training crops
  train/cam          CAM, per pixel the max over the image's tags of the max-normalised CAM
  train/seeds        RecurSeed seeds, VOC palette (ignore = 255 light grey), once RecurSeed is on
  train/mixed        the mixed batch's images ...          } once mixing is on
  train/mixed_seeds  ... and their targets, VOC palette    }
`save_png` writes a label map or an RGB picture to a PNG file (export and predict).
"""
import time

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image

from rsepm_jax import evaluate
from rsepm_jax import image_ops
from rsepm_jax import parallel
from rsepm_jax import train_step
from rsepm_jax.data import classes
from rsepm_jax.parallel import DATA_AXIS


def jet(values):
  """Values in [0, 1] `[...]` -> float RGB in [0, 1] `[..., 3]` (blue - cyan - yellow - red)."""
  centres = jnp.asarray([0.75, 0.5, 0.25], jnp.float32)  # red, green, blue
  return jnp.clip(1.5 - jnp.abs(4.0 * values[..., None] - 4.0 * centres), 0.0, 1.0)


def to_uint8(rgb):
  return jnp.clip(jnp.round(rgb), 0, 255).astype(jnp.uint8)


def save_png(array, path):
  """Writes uint8 labels `[H, W]` (a VOC palette PNG) or an RGB picture `[H, W, 3]` to the
  `epath.Path` `path`, atomically: to `<path>.tmp` beside it, then renamed over `path`, so that
  a killed run leaves no truncated `path` (one writer per file)."""
  array = np.asarray(array)
  if array.dtype != np.uint8 or not (array.ndim == 2 or array.shape[2:] == (3,)):
    raise ValueError(f"save_png({path}): expected uint8 [H, W] labels or [H, W, 3] RGB, got "
                     f"{array.dtype} {list(array.shape)}.")
  png = Image.fromarray(array)
  if array.ndim == 2:
    png.putpalette(classes.color_palette().reshape(-1).tolist())  # 'L' -> 'P', same indices
  temporary = path.parent / f"{path.name}.tmp"
  with temporary.open("wb") as f:
    png.save(f, format="PNG")
  temporary.replace(path)


def colour_labels(labels, size):
  """Label maps int `[N, h, w]` -> palette colours uint8 `[N, *size, 3]` (nearest resize)."""
  palette = jnp.asarray(classes.color_palette())
  return palette[image_ops.resize_nearest(labels, size)]


def make_pictures_fn(model, config, mesh, steps_per_epoch, num_images):
  """Jitted `(state, batch, rng) -> {name: uint8 [num_images, S, S, 3]}` (replicated).

  `state`: the train state (`step`, `params`, `batch_stats` are used); `batch`, `rng`: as for the
  train step. Before RecurSeed is on the seeds are all ignore, and so is what they feed.
  """
  compute_loss, _ = train_step.make_loss_fns(model, config)
  mixing = train_step.mix_settings(config)

  def per_device(state, batch, rng):
    epoch = state["step"] // steps_per_epoch
    rngs = train_step.step_rngs(rng, state["step"])
    _, (_, _, mix_inputs, cams) = compute_loss(
        state["params"], state["batch_stats"], batch, rngs, epoch)
    out = {"image": batch["image"], "cams": cams, "labels": batch["labels"],
           "crop_box": batch["crop_box"]}
    if mix_inputs is not None:
      out["seeds"] = mix_inputs["seeds"]
      if mixing is not None:
        mixed = train_step.mix_across_devices(rngs["mix"], mix_inputs, mixing)
        out["mixed"], out["mixed_seeds"] = mixed["images"], mixed["seeds"]
    return out

  def pictures(state, batch, rng):
    state = {k: state[k] for k in ("step", "params", "batch_stats")}
    local = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                          out_specs=P(DATA_AXIS))(state, batch, rng)
    few = jax.tree.map(lambda x: x[:num_images], local)
    size = few["image"].shape[1:3]
    scores = evaluate.upsampled_cam_scores(few["cams"], few["crop_box"], size)
    cam = jnp.max(jnp.where(few["labels"][:, None, None, :] > 0, scores, 0.0), axis=-1)
    out = {"input": few["image"],
           "cam": to_uint8(0.5 * few["image"].astype(jnp.float32) + 127.5 * jet(cam))}
    if "seeds" in few:
      out["seeds"] = colour_labels(few["seeds"], size)
    if "mixed" in few:
      out["mixed"] = to_uint8(image_ops.denormalize(few["mixed"]))
      out["mixed_seeds"] = colour_labels(few["mixed_seeds"], size)
    return out

  return jax.jit(pictures, out_shardings=parallel.replicated(mesh))


class TrainingPictures:
  """Writes the pictures of `make_pictures_fn` to a `MetricWriter` (every process must call
  `write`: the function runs collectives); the seeds once RecurSeed is on, the mixed batch once
  mixing is on (`config.loss`). Nothing is computed without `config.train.tensorboard`."""

  def __init__(self, model, config, mesh, steps_per_epoch):
    self._num_images = 0
    if config.train.tensorboard:
      self._num_images = min(config.train.num_summary_images, config.train.global_batch_size)
    self._loss_config = config.loss
    self._steps_per_epoch = steps_per_epoch
    self._fn = None
    if self._num_images > 0:
      self._fn = make_pictures_fn(model, config, mesh, steps_per_epoch, self._num_images)
    self._compiled = False

  def write(self, writer, step, state, batch, rng):
    """Pictures of `batch` with the weights of `state` (at `step`), written at `step`."""
    if self._fn is None:
      return
    if not self._compiled:
      start = time.time()
      self._fn = parallel.compile_on_every_process(self._fn, state, batch, rng, name="pictures")
      self._compiled = True
      logging.info("Compiled the TensorBoard training pictures in %.0f s.", time.time() - start)
    pictures = jax.device_get(self._fn(state, batch, rng))
    epoch = step // self._steps_per_epoch
    shown = ["input", "cam"]
    if epoch >= self._loss_config.rs_start_epoch:
      shown.append("seeds")
    if train_step.mix_phase_on(epoch, self._loss_config):
      shown += ["mixed", "mixed_seeds"]
    writer.write_images(step, {f"train/{name}": pictures[name] for name in shown
                               if name in pictures})
