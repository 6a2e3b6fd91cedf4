"""Speed table: the train step, the eval pass and the refinement components, on any backend.

  python -m rsepm_jax.benchmark --config=configs/demo.py
  python -m rsepm_jax.benchmark --config=configs/voc.py --isolate --out_dir=/tmp/bench
  python -m rsepm_jax.benchmark --config=configs/voc.py --rows=compare   # JAX vs PyTorch, CPU

`launch/accelerator_benchmark.sh` runs the second line on one GPU or TPU within 8 minutes.

Rows (`--rows`, comma-separated; default all but `compare`, which is added when torch imports):
  train       the config's train step with every phase on (RecurSeed with the decoder source, the
              configured mixing and its second pass) on synthetic random inputs of the config's
              crop size and global batch: no data set and no ImageNet weights are needed.
  mix         the configured mix_batch on that batch (its share of the step in the notes).
  eval        eval forward + CAM threshold sweep, the config's eval batch and size.
  pamr, pamr_torch, scg, canny, epm, crf
              the components at the sizes of a `--component_size` crop (PAMR on the stride-4
              grid with 21 channels, SCG on the stride-16 grid, Canny and EPM on full images);
              pamr_torch is the official PAMR's computation in PyTorch (when torch imports);
              crf is the dense CRF (RS+EPM's parameters, 21 labels) on one image of
              component_size x 3/4 of it (VOC's 500 x 375 at 512), timed against pydensecrf
              where it imports.
  msflip      `inference.multiscale` (the config's model with its decoder, randomly initialised;
              config.inference.scales and hflip) on one uint8 image of that 3/4 x component_size.
  msflip_crf  the whole `paper_eval.predict_label` on that image: multi-scale + flip, 4 random GT
              tags, background of config.inference, dense CRF (the paper's pseudo labels).
  deeplab_train, affinity_train
              the multi-stage networks' train steps (DeepLabv3+ with its 48-channel low-level
              block; IRNet's boundary network with its affinity loss) with the config's
              backbone, batch and crop, on the train row's synthetic batch (masks random).
  random_walk the random walk (config.rw) on the stride-4 grid of that 3/4 x component_size
              image, the config's classes.
  cam_train, puzzlecam_train
              the CAM classifier alone (no decoder) trained by the classification loss, and by
              Puzzle-CAM's step (a second pass on the 2x2 tiles, three losses), the config's
              backbone, batch and crop; the Puzzle-CAM row notes its time over the CAM row's.
  resnest_train
              Puzzle-CAM's step with a ResNeSt-50 backbone (the config's backbone when it is a
              ResNeSt), batch and crop (not a default row on a CPU: it compiles for minutes).
  compare     our JAX train step against a PyTorch train step written here from the spec
              (torchvision ResNet, random init; DeepLabv3+ head; CAM classifier; SCG; PAMR in
              the unfold formulation; SGD), both float32 without mixing, at `--compare_batch` x
              `--compare_size`, on the CPU, timed the same way. Needs torch and a resnet backbone.

Each row is compiled once (compile s = `lower` + `compile`), run once to warm up, then timed
`--repeats` times: median, 10th-90th percentile and images/s (msflip rows: several jitted calls
and host code, so the warm-up call, which compiles, is timed instead of `compile`, and there are
no FLOPs). Memory: the device's
`memory_stats()["peak_bytes_in_use"]` (n/a where the backend reports none, e.g. CPU; it is the
process's peak so far, so with `--isolate`, which runs every row in its own process under a
timeout, it is the row's own) and XLA's estimate for the compiled program (arguments + outputs +
temporaries - donated). FLOPs are XLA's (`compiled.cost_analysis()`, per device); MFU divides
them by the median time and the device's peak dense bf16 FLOP/s (`PEAK_BF16_FLOPS`), and is
printed for the convolution and matmul rows only: XLA counts a loop body once, so PAMR's
iterations are undercounted, and the elementwise rows are memory-bound anyway.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from rsepm_jax import inference
from rsepm_jax import optimizer
from rsepm_jax import paper_eval
from rsepm_jax import parallel
from rsepm_jax import state as state_lib
from rsepm_jax import train
from rsepm_jax import train_step
from rsepm_jax.evaluate import cam_thresholds
from rsepm_jax.evaluate import make_eval_step
from rsepm_jax.refine import canny
from rsepm_jax.refine import crf
from rsepm_jax.refine import edge_predict_mix
from rsepm_jax.refine import pamr
from rsepm_jax.refine import random_walk
from rsepm_jax.refine import scg

ALL_ROWS = ("train", "mix", "eval", "pamr", "pamr_torch", "scg", "canny", "epm", "crf", "msflip",
            "msflip_crf", "deeplab_train", "affinity_train", "random_walk", "cam_train",
            "puzzlecam_train", "resnest_train", "compare")

# Peak dense (non-sparse) bf16 tensor FLOP/s per device, from the vendors' datasheets (NVIDIA
# H100/H200 and A100 datasheets, Google Cloud TPU system-architecture pages). First substring
# of the lower-cased `device_kind` that matches wins. A TPU v4/v5p/v6e JAX device is one chip.
PEAK_BF16_FLOPS = (
    ("h200 nvl", 835e12),
    ("h200", 989e12),  # SXM
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)


class NotApplicable(Exception):
  """A row that cannot run in this set-up; its message is printed in the table."""


def peak_flops(device_kind):
  """Peak dense bf16 FLOP/s of a `device_kind`, or None when it is not in the table."""
  kind = device_kind.lower()
  return next((flops for pattern, flops in PEAK_BF16_FLOPS if pattern in kind), None)


def peak_device_bytes():
  """`peak_bytes_in_use` of the first local device, or None where the backend reports none."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  return stats.get("peak_bytes_in_use") or None


def compile_fn(fn, args):
  """(compiled, seconds) of `fn.lower(*args).compile()`."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def program_cost(compiled):
  """(FLOPs, XLA memory estimate in bytes) of a compiled program; None where unavailable."""
  flops = memory = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    flops = float(cost.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    stats = compiled.memory_analysis()
    memory = (stats.argument_size_in_bytes + stats.output_size_in_bytes
              + stats.temp_size_in_bytes - stats.alias_size_in_bytes) or None
  except Exception:  # pylint: disable=broad-except
    pass
  return flops, memory


def timed_runs(call, repeats, warm_up=True):
  """Seconds of `repeats` calls of `call()` (blocked on its result), after one warm-up call."""
  if warm_up:
    jax.block_until_ready(call())
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    runs.append(time.perf_counter() - start)
  return runs


def make_row(key, name, images, runs, compile_s=None, compiled=None, mfu=False, note=""):
  """A result row; `compiled` gives the FLOPs and memory estimate, `mfu` whether MFU is sensible."""
  median = float(np.median(runs))
  p10, p90 = (float(v) for v in np.percentile(runs, [10, 90]))
  flops, xla_bytes = program_cost(compiled) if compiled is not None else (None, None)
  peak = peak_flops(jax.devices()[0].device_kind)
  return {
      "key": key, "name": name, "status": "ok", "note": note,
      "median_ms": 1e3 * median, "p10_ms": 1e3 * p10, "p90_ms": 1e3 * p90,
      "images_per_s": images / median if images else None,
      "compile_s": compile_s,
      "peak_bytes": peak_device_bytes(),
      "xla_bytes": xla_bytes,
      "gflops": flops / 1e9 if flops else None,
      "tflops_per_s": flops / median / 1e12 if flops else None,
      "mfu": flops / median / peak if (mfu and flops and peak) else None,
  }


def status_row(key, status, note=""):
  return {"key": key, "name": key, "status": status, "note": note}


def measure(key, name, fn, args, repeats, images, mfu=False, note=""):
  """Row of a jitted `fn(*args)`: compiled once, then timed."""
  compiled, compile_s = compile_fn(fn, args)
  runs = timed_runs(lambda: compiled(*args), repeats)
  return make_row(key, name, images, runs, compile_s, compiled, mfu, note)


# ----------------------------------------------------------------------------- model rows


def synthetic_batch(batch_size, size, num_classes, seed=0):
  """Host batch of random uint8 images, multi-hot tags (class 0 always on), full crop boxes."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((batch_size, num_classes)) < 0.3).astype(np.float32)
  labels[:, 0] = 1.0
  return {
      "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
      "mask": rng.integers(0, num_classes + 1, (batch_size, size, size)).astype(np.uint8),
      "labels": labels,
      "crop_box": np.tile(np.array([[0, 0, size, size]], np.int32), (batch_size, 1)),
  }


def random_cams(settings, batch_size, grid, num_classes):
  """Random CAM logits `[B, grid, grid, C]` for a mixing kind that reads the CAMs, else None."""
  if settings.kind not in edge_predict_mix.CAM_KINDS:
    return None
  return jax.random.normal(jax.random.key(3), (batch_size, grid, grid, num_classes))


def phases_on(config, decoder_source=True):
  """A copy of `config` whose step runs RecurSeed (and the mixing) from step 0."""
  config = config.copy_and_resolve_references()
  config.loss.rs_start_epoch = config.loss.mix_start_epoch = 0
  config.loss.decoder_source_epoch = 0 if decoder_source else 10**6
  return config


class TrainSetup:
  """Model, optimiser, replicated train state, synthetic batch and the jitted step."""

  def __init__(self, config):
    self.config = config
    self.mesh = parallel.make_mesh()
    self.batch_size = config.train.global_batch_size
    self.size = config.data.crop_size
    parallel.local_batch_size(self.batch_size)
    self.model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
    self.tx = optimizer.make_optimizer(config.optim, total_steps=1000)
    self.state = state_lib.create_train_state(
        self.model, self.tx, config, state_lib.prng_key(0), self.mesh, pretrained=False)
    self.host_batch = synthetic_batch(self.batch_size, self.size, config.data.num_classes)
    self.batch = parallel.to_global(self.host_batch, self.mesh)
    self.step = train.step_module(config).make_train_step(self.model, self.tx, config, self.mesh,
                                                          total_steps=1000, steps_per_epoch=1)
    self.rng = jax.device_put(state_lib.prng_key(1), parallel.replicated(self.mesh))

  def run(self, repeats):
    """(compiled step, compile seconds, run seconds); the step donates its state, so each run
    is fed the previous run's output."""
    compiled, compile_s = compile_fn(self.step, (self.state, self.batch, self.rng))

    def call():
      self.state, metrics = compiled(self.state, self.batch, self.rng)
      return metrics

    return compiled, compile_s, timed_runs(call, repeats)


class Benchmark:
  """Runs rows by key on one config; the train set-up is built once and shared."""

  def __init__(self, config, repeats=10, component_size=512, component_batch=8,
               compare_batch=2, compare_size=256, mfu=True):
    self.config = config
    self.repeats = repeats
    self.component_size = component_size
    self.component_batch = component_batch
    self.compare_batch = compare_batch
    self.compare_size = compare_size
    self.mfu = mfu
    self._train = None

  def train_setup(self):
    if self._train is None:
      self._train = TrainSetup(phases_on(self.config))
    return self._train

  def run(self, key):
    """List of rows for `key`; a failure becomes an "error" row, not an exception."""
    try:
      rows = getattr(self, f"row_{key}")()
    except NotApplicable as reason:
      rows = [status_row(key, "n/a", str(reason))]
    except Exception as error:  # pylint: disable=broad-except
      rows = [status_row(key, "error", f"{type(error).__name__}: {error}".splitlines()[0][:300])]
    if not self.mfu:
      for row in rows:
        row.update(gflops=None, tflops_per_s=None, mfu=None)
    return rows

  def row_train(self):
    setup = self.train_setup()
    compiled, compile_s, runs = setup.run(self.repeats)
    config = setup.config
    name = (f"train step (RS + {config.mix.kind}), {config.model.backbone}, batch {setup.batch_size} "
            f"x {setup.size}px, {config.model.dtype}")
    return [make_row("train", name, setup.batch_size, runs, compile_s, compiled, mfu=True)]

  def row_mix(self):
    config = phases_on(self.config)
    settings = train_step.mix_settings(config)
    if settings is None:
      raise NotApplicable("config.mix.kind = none")
    batch_size, size = config.train.global_batch_size, config.data.crop_size
    num_classes = config.data.num_classes
    host = synthetic_batch(batch_size, size, num_classes)
    rng = np.random.default_rng(0)
    mask_size = size // 4
    seeds = jnp.asarray(rng.integers(0, num_classes + 1, (batch_size, mask_size, mask_size)),
                        jnp.int32)
    probs = jax.nn.one_hot(seeds, num_classes + 1)
    labels, box = jnp.asarray(host["labels"]), jnp.asarray(host["crop_box"])
    cams = random_cams(settings, batch_size, size // train_step.cam_stride(config), num_classes)
    mix_fn = jax.jit(lambda key, im, sd, pr: edge_predict_mix.mix_batch(
        key, im, sd, pr, labels, box, settings, cams))
    images = train_step.model_inputs({k: jnp.asarray(v) for k, v in host.items()})
    return [measure("mix", f"{config.mix.kind} mix_batch on the train batch", mix_fn,
                    (state_lib.prng_key(2), images, seeds, probs), self.repeats, batch_size)]

  def row_eval(self):
    setup = self.train_setup()
    config = setup.config
    batch_size, size = config.eval.global_batch_size, config.data.eval_size
    parallel.local_batch_size(batch_size, "config.eval.global_batch_size")
    host = synthetic_batch(batch_size, size, config.data.num_classes, seed=1)
    batch = parallel.to_global({**host, "valid": np.ones(batch_size, bool)}, setup.mesh)
    thresholds = jnp.asarray(cam_thresholds(config.eval), jnp.float32)
    eval_step = make_eval_step(setup.model, config.data.num_classes, thresholds, setup.mesh)
    variables = state_lib.eval_variables(setup.state)
    return [measure("eval", f"eval forward + CAM sweep, batch {batch_size} x {size}px",
                    eval_step, (variables, batch), self.repeats, batch_size, mfu=True)]

  # --------------------------------------------------------------------------- components

  def _component_inputs(self):
    rng = np.random.default_rng(0)
    batch, size = self.component_batch, self.component_size
    mask_size = size // 4
    image = jnp.asarray(rng.normal(size=(batch, mask_size, mask_size, 3)), jnp.float32)
    masks = jax.nn.softmax(jnp.asarray(rng.normal(size=(batch, mask_size, mask_size, 21)),
                                       jnp.float32), axis=-1)
    return image, masks

  def row_pamr(self):
    image, masks = self._component_inputs()
    rs = self.config.recurseed
    fn = jax.jit(lambda im, m: pamr.pamr(im, m, num_iter=rs.pamr_iter,
                                         dilations=tuple(rs.pamr_dilations), sigma=rs.pamr_sigma))
    name = (f"PAMR {'x'.join(map(str, masks.shape))}, {rs.pamr_iter} iters, "
            f"dilations {tuple(rs.pamr_dilations)}")
    return [measure("pamr", name, fn, (image, masks), self.repeats, masks.shape[0])]

  def row_pamr_torch(self):
    image, masks = self._component_inputs()
    runs = torch_pamr_runs(np.asarray(image), np.asarray(masks), self.config.recurseed,
                           max(self.repeats // 2, 1))
    return [make_row("pamr_torch", "PAMR, PyTorch (the official unfold formulation, NCHW)",
                     masks.shape[0], runs)]

  def row_scg(self):
    rng = np.random.default_rng(0)
    batch, grid = self.component_batch, self.component_size // 16
    scores = jnp.asarray(rng.random((batch, grid, grid, 20)), jnp.float32)
    features = [jnp.asarray(rng.normal(size=(batch, grid, grid, d)), jnp.float32)
                for d in (1024, 2048)]
    fn = jax.jit(lambda s, f: scg.scg(s, f))
    return [measure("scg", f"SCG {batch}x{grid}x{grid}, D=1024+2048, C=20", fn,
                    (scores, features), self.repeats, batch, mfu=True)]

  def row_canny(self):
    rng = np.random.default_rng(0)
    batch, size = self.component_batch, self.component_size
    gray = jnp.asarray(rng.integers(0, 256, (batch, size // 4, size // 4)), jnp.float32)
    gray = jax.image.resize(gray, (batch, size, size), "linear")  # some structure, not noise
    mix = self.config.mix
    fn = jax.jit(lambda g: canny.canny(g, mix.canny_low, mix.canny_high, mix.canny_blur))
    return [measure("canny", f"Canny {batch}x{size}x{size}", fn, (gray,), self.repeats, batch)]

  def row_epm(self):
    rng = np.random.default_rng(0)
    batch, size = self.component_batch, self.component_size
    _, masks = self._component_inputs()
    images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    seeds = jnp.argmax(masks, -1).astype(jnp.int32)
    labels = jnp.ones((batch, 20), jnp.float32)
    box = jnp.tile(jnp.array([[0, 0, size, size]], jnp.int32), (batch, 1))
    settings = train_step.mix_settings(self.config) or edge_predict_mix.MixSettings()
    cams = random_cams(settings, batch, size // 16, labels.shape[1])
    fn = jax.jit(lambda key, im, sd, pr: edge_predict_mix.mix_batch(
        key, im, sd, pr, labels, box, settings, cams))
    return [measure("epm", f"{settings.kind} mix_batch {batch}x{size}px "
                    f"(edges: {settings.edge_source})", fn,
                    (state_lib.prng_key(0), images, seeds, masks), self.repeats, batch)]

  def _voc_sized_image(self, rng):
    """uint8 `[1, H, W, 3]`, W = component_size, H = 3/4 of it (VOC's 500 x 375 at 512): random
    colours bilinear from a 16x coarser grid, so that it has regions and edges."""
    width = self.component_size
    height = width * 3 // 4
    coarse = jnp.asarray(rng.integers(0, 256, (1, height // 16, width // 16, 3)), jnp.float32)
    return jax.image.resize(coarse, (1, height, width, 3), "linear").astype(jnp.uint8)

  def row_crf(self):
    rng = np.random.default_rng(0)
    image = self._voc_sized_image(rng)
    _, height, width, _ = image.shape
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, height, width, 21)), jnp.float32), -1)
    row = measure("crf", f"dense CRF 1x{height}x{width}x21, 10 iterations",
                  jax.jit(crf.dense_crf_batch), (image, probs), self.repeats, 1)
    try:
      pydensecrf_s = pydensecrf_seconds(np.asarray(image[0]), np.asarray(probs[0]))
    except ImportError:
      pass
    else:
      row["note"] = (f"pydensecrf {1e3 * pydensecrf_s:.0f} ms (CPU, 1 thread): "
                     f"{row['median_ms'] / 1e3 / pydensecrf_s:.1f}x its time")
    return [row]

  # --------------------------------------------------------------------------- inference

  def _inference_inputs(self):
    """(model, evaluation variables, uint8 `[H, W, 3]` image) of the msflip rows."""
    if not self.config.model.with_decoder:
      raise NotApplicable("config.model.with_decoder = False")
    setup = self.train_setup()
    image = np.asarray(self._voc_sized_image(np.random.default_rng(0))[0])
    return setup.model, state_lib.eval_variables(setup.state), image

  def _host_row(self, key, name, call):
    """Row of `call()`, host code around several jitted calls: the first call (which compiles)
    is timed in the note, then `repeats` calls."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    first_s = time.perf_counter() - start
    runs = timed_runs(call, self.repeats, warm_up=False)
    return make_row(key, name, 1, runs, note=f"first call (compiles) {first_s:.1f} s")

  def _views(self):
    settings = self.config.inference
    flip = " + flip" if settings.hflip else ""
    return f"scales {tuple(settings.scales)}{flip}"

  def row_msflip(self):
    model, variables, image = self._inference_inputs()
    settings = self.config.inference
    height, width, _ = image.shape
    return [self._host_row(
        "msflip", f"multi-scale inference 1x{height}x{width}, {self._views()}",
        lambda: inference.multiscale(model, variables, image, tuple(settings.scales),
                                     settings.hflip, settings.size_bucket))]

  def row_msflip_crf(self):
    model, variables, image = self._inference_inputs()
    num_classes = self.config.data.num_classes
    tags = np.zeros(num_classes, bool)
    tags[np.random.default_rng(0).choice(num_classes, min(4, num_classes), replace=False)] = True
    height, width, _ = image.shape
    return [self._host_row(
        "msflip_crf", f"predict_label 1x{height}x{width}, {self._views()}, {tags.sum()} tags, "
        "dense CRF", lambda: paper_eval.predict_label(model, variables, image, self.config,
                                                      tags=tags, use_crf=True))]

  # --------------------------------------------------------------------------- multi-stage

  def _stage_row(self, key, arch, what):
    """Train-step row of the config's backbone, batch and crop as the network `arch`."""
    config = self.config.copy_and_resolve_references()
    config.model.arch = arch
    if arch == "deeplabv3plus":
      config.model.low_level_channels = 48
    else:  # the boundary network: only the edge layers learn
      config.optim.lr_backbone_weight = config.optim.lr_backbone_bias = 0.0
    return self._config_row(key, what, config)

  def _config_row(self, key, what, config):
    """Train-step row of `config` (its step module, backbone, batch and crop)."""
    setup = TrainSetup(config)
    compiled, compile_s, runs = setup.run(self.repeats)
    name = (f"{what} train step, {config.model.backbone}, batch {setup.batch_size} x "
            f"{setup.size}px, {config.model.dtype}")
    return [make_row(key, name, setup.batch_size, runs, compile_s, compiled, mfu=True)]

  def row_deeplab_train(self):
    return self._stage_row("deeplab_train", "deeplabv3plus", "DeepLabv3+ (low-level 48)")

  def _classifier_row(self, key, method, what, backbone=None):
    """Train-step row of the CAM classifier (no decoder) trained by `method`."""
    config = self.config.copy_and_resolve_references()
    config.method, config.model.with_decoder, config.mix.kind = method, False, "none"
    config.model.backbone = backbone or config.model.backbone
    return self._config_row(key, what, config)

  def row_cam_train(self):
    return self._classifier_row("cam_train", "rsepm", "CAM classifier (L_cls)")

  def row_puzzlecam_train(self):
    return self._classifier_row("puzzlecam_train", "puzzlecam", "Puzzle-CAM")

  def row_resnest_train(self):
    backbone = self.config.model.backbone
    return self._classifier_row("resnest_train", "puzzlecam", "Puzzle-CAM",
                                backbone if backbone.startswith("resnest") else "resnest50")

  def row_affinity_train(self):
    return self._stage_row("affinity_train", "affinity",
                           f"boundary network (pair radius {self.config.affinity.radius})")

  def row_random_walk(self):
    rw = self.config.rw
    grid = (-(-self.component_size * 3 // 16), -(-self.component_size // 4))  # stride 4
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.random((1, *grid, self.config.data.num_classes)), jnp.float32)
    edge = jnp.asarray(rng.random((1, *grid)), jnp.float32)
    walk = jax.jit(lambda s, e: random_walk.propagate(s, e, rw.radius, rw.beta, rw.exp_times))
    return [measure("random_walk", f"random walk 1x{grid[0]}x{grid[1]}x"
                    f"{self.config.data.num_classes}, radius {rw.radius}, {2**rw.exp_times} steps",
                    walk, (scores, edge), self.repeats, 1)]

  # --------------------------------------------------------------------------- JAX vs PyTorch

  def compare_config(self):
    config = phases_on(self.config, decoder_source=False)
    config.data.crop_size = self.compare_size
    config.train.global_batch_size = self.compare_batch
    config.model.dtype = "float32"
    config.mix.kind = "none"
    return config

  def row_compare(self):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise NotApplicable("torch is not installed") from None
    if jax.default_backend() != "cpu":
      raise NotApplicable("the PyTorch step runs on the CPU; compare with JAX_PLATFORMS=cpu")
    config = self.compare_config()
    if config.model.backbone not in ("resnet50", "resnet101"):
      raise NotApplicable(f"the PyTorch step uses torchvision's resnet50/101, not "
                          f"{config.model.backbone!r}")
    what = (f"{config.model.backbone}, RS (SCG + PAMR), no mix, batch {self.compare_batch} x "
            f"{self.compare_size}px, float32")
    torch_step = torch_train_step(config)
    start = time.perf_counter()
    torch_step()
    first_s = time.perf_counter() - start
    setup = TrainSetup(config)
    compiled, compile_s = compile_fn(setup.step, (setup.state, setup.batch, setup.rng))

    def jax_step():
      setup.state, metrics = compiled(setup.state, setup.batch, setup.rng)
      return metrics

    jax.block_until_ready(jax_step())
    # Alternated run by run, so that a change in the machine's load hits both sides alike.
    jax_runs, torch_runs = [], []
    for _ in range(self.repeats):
      jax_runs += timed_runs(jax_step, 1, warm_up=False)
      torch_runs += timed_runs(torch_step, 1, warm_up=False)
    torch_row = make_row("compare", f"PyTorch {torch.__version__} train step, same (NCHW, eager)",
                         self.compare_batch, torch_runs,
                         note=f"eager, no compile; first step {first_s:.1f} s")
    jax_row = make_row("compare", f"JAX train step: {what}", self.compare_batch, jax_runs,
                       compile_s, compiled, mfu=True)
    ratio = jax_row["median_ms"] / torch_row["median_ms"]
    jax_row["note"] = f"JAX / PyTorch step time {ratio:.2f}"
    jax_row["jax_over_torch"] = ratio
    return [jax_row, torch_row]


# ----------------------------------------------------------------------------- PyTorch


def _torch_neighbours(x, dilations, include_centre):
  """[B, C, K, H, W] dilated 3x3 neighbours of `x` [B, C, H, W], replicate padding (unfold)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  views = []
  for d in dilations:
    padded = F.pad(x, [d, d, d, d], mode="replicate")
    patches = F.unfold(padded, 3, dilation=d).view(x.shape[0], x.shape[1], 9, *x.shape[2:])
    views.append(patches if include_centre else patches[:, :, [0, 1, 2, 3, 5, 6, 7, 8]])
  return torch.cat(views, dim=2)


def _torch_pamr(image, masks, num_iter, dilations, sigma):
  """PAMR in the official module's formulation: affinities from unfolded image neighbours."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  std = _torch_neighbours(image, dilations, True).std(dim=2, keepdim=True)
  affinity = -(_torch_neighbours(image, dilations, False) - image.unsqueeze(2)).abs() / (
      1e-8 + sigma * std)
  weights = F.softmax(affinity.mean(dim=1, keepdim=True), dim=2)
  for _ in range(num_iter):
    masks = (_torch_neighbours(masks, dilations, False) * weights).sum(dim=2)
  return masks


def torch_pamr_runs(image, masks, rs, repeats):
  """Seconds of `repeats` runs of PAMR in PyTorch on NHWC numpy inputs (after a warm-up)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise NotApplicable("torch is not installed") from None
  image = torch.from_numpy(np.array(image)).permute(0, 3, 1, 2).contiguous()
  masks = torch.from_numpy(np.array(masks)).permute(0, 3, 1, 2).contiguous()

  def run():
    with torch.no_grad():
      return _torch_pamr(image, masks, rs.pamr_iter, tuple(rs.pamr_dilations), rs.pamr_sigma)

  run()
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    runs.append(time.perf_counter() - start)
  return runs


def pydensecrf_seconds(image, probs, repeats=3):
  """Median seconds of pydensecrf's CRF (RS+EPM's parameters, 10 iterations) on [H, W, 3] uint8
  and [H, W, K]; ImportError where pydensecrf (or pydensecrf2) is not installed."""
  from pydensecrf import densecrf  # pylint: disable=g-import-not-at-top
  height, width, num_labels = probs.shape
  unary = np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(-1, num_labels).T)
  image = np.array(image, np.uint8, order="C")  # writable: pydensecrf refuses read-only buffers

  def run():
    model = densecrf.DenseCRF2D(width, height, num_labels)
    model.setUnaryEnergy(unary)
    model.addPairwiseGaussian(sxy=1, compat=3)
    model.addPairwiseBilateral(sxy=67, srgb=3, rgbim=image, compat=4)
    return model.inference(10)

  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    runs.append(time.perf_counter() - start)
  return float(np.median(runs))


def _torch_min_max(x, dim):
  low = x.amin(dim=dim, keepdim=True)
  high = x.amax(dim=dim, keepdim=True)
  return (x - low) / (high - low + 1e-10)


def _torch_scg(scores, features, rs):
  """SCG (rsepm_spec 2.1) of `scores` [B, C, h, w] with `features` [B, D, h, w], PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top

  def column_normalize(m):
    return m / (m.sum(dim=1, keepdim=True) + 1e-10)

  batch, num_classes, height, width = scores.shape
  n = height * width
  correlation = 0.0
  for f in features:
    v = f.flatten(2).transpose(1, 2)
    v = v / (v.norm(dim=-1, keepdim=True) + 1e-10)
    first = torch.relu(v @ v.transpose(1, 2))
    first = torch.where(first < rs.first_th, 0.0, first)
    transition = column_normalize(first * (1 - torch.eye(n)))
    second = transition
    for _ in range(rs.scg_iterations):
      second = column_normalize(second @ transition)
    second = torch.where(second < rs.second_th / n, 0.0, second)
    correlation = correlation + column_normalize(
        torch.maximum(column_normalize(first), rs.scg_second_weight * second))
  correlation = _torch_min_max(correlation, 1)
  flat = scores.flatten(2).transpose(1, 2)

  def seeded(seeds):
    summed = correlation @ seeds.float()
    return torch.where(seeds.any(dim=1, keepdim=True), _torch_min_max(summed, 1), 0.0)

  maps = _torch_min_max(torch.relu(seeded(flat >= rs.fg_th) - seeded(flat <= rs.bg_th)), 1)
  return maps.transpose(1, 2).reshape(batch, num_classes, height, width)


def torch_resnet(name):
  """torchvision's `resnet50`/`resnet101` (random init), or the same layout written here when
  torchvision does not import (e.g. a build that does not match the installed torch)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    return getattr(torchvision.models, name)(weights=None)
  except (ImportError, RuntimeError):
    pass

  class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
      super().__init__()
      cout = 4 * width
      self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = torch.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self, stage_sizes):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
      self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
      cin = 64
      for stage, blocks in enumerate(stage_sizes):
        width = 64 * 2**stage
        layers = []
        for block in range(blocks):
          layers.append(Bottleneck(cin, width, 2 if (block == 0 and stage > 0) else 1))
          cin = 4 * width
        setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))

  return ResNet({"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}[name])


def torch_train_step(config):
  """The PyTorch train step on random inputs of the config's shape, as a no-argument callable.

  Written from the spec, not from the official code: torchvision's ResNet (random init; when
  torchvision does not import, `_TorchResNet`, the same v1.5 layout), layer4 at stride 1 and
  undilated as in models/resnet.py, 1x1 CAM classifier, ASPP + DeepLabv3+
  decoder, RecurSeed under no_grad (CAM source, SCG on C4+C5, background (1 - max)^gamma, PAMR
  on the stride-4 grid, threshold confidence filter), L_cls + L_seg + L_cam, SGD with Nesterov
  momentum and weight decay, and the EMA of parameters and BN buffers.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model_config, rs, loss_config = config.model, config.recurseed, config.loss
  num_classes = config.data.num_classes
  backbone = torch_resnet(model_config.backbone)
  backbone.layer4[0].conv2.stride = (1, 1)
  backbone.layer4[0].downsample[0].stride = (1, 1)

  def block(cin, cout, k, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

  channels, low_channels = model_config.decoder_channels, model_config.low_level_channels
  dilations = tuple(model_config.aspp_dilations) or (6, 12, 18)
  head = nn.ModuleDict({
      "classifier": nn.Conv2d(2048, num_classes, 1, bias=False),
      "aspp": nn.ModuleList([block(2048, channels, 1)]
                            + [block(2048, channels, 3, d) for d in dilations]),
      "pool": block(2048, channels, 1),
      "project": block(channels * (len(dilations) + 2), channels, 1),
      "low": block(256, low_channels, 1),
      "conv1": block(channels + low_channels, channels, 3),
      "conv2": block(channels, channels, 3),
      "seg": nn.Conv2d(channels, num_classes + 1, 3, padding=1, bias=False),
  })
  modules = nn.ModuleList([backbone, head]).train()
  params = [p for p in modules.parameters() if p.requires_grad]
  sgd = torch.optim.SGD(params, lr=config.optim.lr, momentum=config.optim.momentum,
                        nesterov=config.optim.nesterov, weight_decay=config.optim.weight_decay)
  ema = [t.detach().clone() for t in params]
  buffers = [b for b in modules.buffers() if b.is_floating_point()]
  ema_buffers = [b.clone() for b in buffers]
  aspp_drop, (drop1, drop2) = model_config.aspp_dropout, model_config.decoder_dropout

  def forward(x):
    b = backbone
    c2 = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
    c4 = b.layer3(b.layer2(c2))
    c5 = b.layer4(c4)
    cams = head["classifier"](c5)
    branches = [m(c5) for m in head["aspp"]]
    pooled = head["pool"](c5.mean(dim=(2, 3), keepdim=True))
    branches.append(F.interpolate(pooled, c5.shape[2:], mode="bilinear", align_corners=False))
    aspp = F.dropout(head["project"](torch.cat(branches, 1)), aspp_drop, True)
    low = head["low"](c2)
    up = F.interpolate(aspp, low.shape[2:], mode="bilinear", align_corners=False)
    y = F.dropout(head["conv1"](torch.cat([up, low], 1)), drop1, True)
    y = F.dropout(head["conv2"](y), drop2, True)
    return cams, head["seg"](y), c4, c5

  def pseudo_mask(x, cams, c4, c5, labels, mask_size):
    tags = labels[:, :, None, None]
    source = torch.relu(cams)
    source = source / (source.amax(dim=(2, 3), keepdim=True) + 1e-5) * tags
    grid = cams.shape[2:]
    features = [F.interpolate(f, grid, mode="bilinear", align_corners=False)
                if f.shape[2:] != grid else f for f in (c4, c5)]
    expanded = _torch_scg(source, features, rs) * tags
    fg = F.interpolate(expanded, mask_size, mode="bilinear", align_corners=False)
    bg = (1 - fg.amax(dim=1, keepdim=True)).clamp(0, 1) ** rs.bg_gamma
    image = F.interpolate(x, mask_size, mode="bilinear", align_corners=True)
    probs = _torch_pamr(image, torch.cat([bg, fg], 1), rs.pamr_iter, tuple(rs.pamr_dilations),
                        rs.pamr_sigma)
    best, label = probs[:, 1:].max(dim=1)
    seeds = torch.where(best >= rs.certain, label + 1, 255)
    return torch.where(best <= rs.uncertain, 0, seeds)

  def step(x, labels, decay=0.999):
    cams, seg, c4, c5 = forward(x)
    with torch.no_grad():
      seeds = pseudo_mask(x, cams.detach(), c4.detach(), c5.detach(), labels, seg.shape[2:])
    cls = F.multilabel_soft_margin_loss(cams.mean(dim=(2, 3)), labels)
    seg_loss = F.cross_entropy(seg, seeds, ignore_index=255)
    cams_up = F.interpolate(cams, seg.shape[2:], mode="bilinear", align_corners=False)
    valid = (seeds != 255)[:, None].float()
    target = F.one_hot(seeds.clamp(max=num_classes), num_classes + 1)[..., 1:].permute(0, 3, 1, 2)
    cam = (F.binary_cross_entropy_with_logits(cams_up, target.float(), reduction="none")
           * valid).sum() / (valid.sum().clamp(min=1) * num_classes)
    loss = loss_config.cls * cls + loss_config.seg * seg_loss + loss_config.cam * cam
    sgd.zero_grad(set_to_none=True)
    loss.backward()
    sgd.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1 - decay)  # pylint: disable=protected-access
      torch._foreach_lerp_(ema_buffers, buffers, 1 - decay)  # pylint: disable=protected-access
    return loss

  host = synthetic_batch(config.train.global_batch_size, config.data.crop_size, num_classes)
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
  x = (torch.from_numpy(host["image"]).permute(0, 3, 1, 2).float() - mean) / std
  labels = torch.from_numpy(host["labels"])
  return lambda: step(x, labels)


# ----------------------------------------------------------------------------- table and main


def _fmt(value, spec, missing=""):
  return missing if value is None else format(value, spec)


def _bytes(value):
  if not value:
    return "n/a"
  return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def format_table(rows):
  """Markdown table of the rows."""
  lines = ["| what | median ms | p10-p90 ms | images/s | compile s | peak device memory | "
           "XLA memory est. | GFLOP | TFLOP/s | MFU | notes |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for row in rows:
    if row["status"] != "ok":
      lines.append(f"| {row['name']} | {row['status']} ({row['note']}) |  |  |  |  |  |  |  |  |  |")
      continue
    lines.append(" | ".join([
        f"| {row['name']}", f"{row['median_ms']:.1f}", f"{row['p10_ms']:.1f}-{row['p90_ms']:.1f}",
        _fmt(row["images_per_s"], ".1f"), _fmt(row["compile_s"], ".1f", "n/a"),
        _bytes(row["peak_bytes"]), _bytes(row["xla_bytes"]),
        _fmt(row["gflops"], ".4g", "n/a"), _fmt(row["tflops_per_s"], ".3g", "n/a"),
        _fmt(row["mfu"] and 100 * row["mfu"], ".1f", "n/a") + ("%" if row["mfu"] else ""),
        f"{row['note']} |"]))
  return "\n".join(lines)


def device_info():
  device = jax.devices()[0]
  peak = peak_flops(device.device_kind)
  return {"backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "peak_bf16_tflops": peak / 1e12 if peak else None}


def default_rows(components_only=False):
  rows = [r for r in ALL_ROWS if r != "compare"]
  if jax.default_backend() == "cpu":  # ResNeSt-50's step compiles for ~8 min on a laptop CPU
    rows.remove("resnest_train")
  if components_only:
    rows = [r for r in rows if r not in ("train", "mix", "eval", "msflip", "msflip_crf")]
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    rows = [r for r in rows if r != "pamr_torch"]
  else:
    if not components_only:
      rows.append("compare")
  return rows


def add_step_shares(rows):
  """Notes the mix row's share of the train step, Puzzle-CAM's step over the CAM step."""
  train = next((r for r in rows if r["key"] == "train" and r["status"] == "ok"), None)
  cam = next((r for r in rows if r["key"] == "cam_train" and r["status"] == "ok"), None)
  for row in rows:
    if cam and row["key"] == "puzzlecam_train" and row["status"] == "ok":
      row["note"] = f"{row['median_ms'] / cam['median_ms']:.2f}x the CAM step"
    if train and row["key"] == "mix" and row["status"] == "ok":
      row["note"] = f"{100 * row['median_ms'] / train['median_ms']:.0f}% of the train step"
    if row["key"] == "pamr_torch" and row["status"] == "ok":
      ours = next((r for r in rows if r["key"] == "pamr" and r["status"] == "ok"), None)
      if ours:
        row["note"] = f"ours is {row['median_ms'] / ours['median_ms']:.1f}x faster"


def _child_argv(base_args, key, json_path):
  """The command line of one row's process: `base_args` (flags as `--name=value`) with --rows,
  --isolate and the outputs replaced."""
  dropped = ("--rows", "--isolate", "--noisolate", "--out_dir", "--json_out")
  args = [a for a in base_args if a.split("=")[0] not in dropped]
  return [sys.executable, "-m", "rsepm_jax.benchmark", *args, f"--rows={key}", "--noisolate",
          "--out_dir=", f"--json_out={json_path}"]


def run_isolated(base_args, keys, row_timeout_s=0, train_timeout_s=0, budget_s=0):
  """Rows run one process each (`python -m rsepm_jax.benchmark *base_args --rows=KEY`), under
  their timeout and the remaining budget; a row that overruns is killed and reported."""
  rows = []
  start = time.perf_counter()
  for key in keys:
    timeout = (train_timeout_s or row_timeout_s) if key in ("train", "compare") else row_timeout_s
    if budget_s:
      left = budget_s - (time.perf_counter() - start)
      if left < 5:
        rows.append(status_row(key, "skipped", f"the {budget_s:.0f} s budget is spent"))
        continue
      timeout = min(timeout, left) if timeout else left
    with tempfile.TemporaryDirectory() as tmp:
      json_path = os.path.join(tmp, "rows.json")
      row_start = time.perf_counter()
      try:
        done = subprocess.run(_child_argv(base_args, key, json_path), capture_output=True, text=True,
                              timeout=timeout or None, check=False)
      except subprocess.TimeoutExpired:
        rows.append(status_row(key, "timeout", f"stopped after {timeout:.0f} s"))
        print(f"[{key}] timeout after {timeout:.0f} s", flush=True)
        continue
      if done.returncode == 0 and os.path.exists(json_path):
        with open(json_path) as f:
          rows.extend(json.load(f)["rows"])
      else:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        rows.append(status_row(key, "error", f"exit {done.returncode}: {last}"))
      print(f"[{key}] {time.perf_counter() - row_start:.0f} s", flush=True)
  return rows


def write_outputs(result, table, out_dir, json_out):
  if json_out:
    with open(json_out, "w") as f:
      json.dump(result, f, indent=2)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmark.json"), "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "benchmark.md"), "w") as f:
      f.write(table + "\n")


def run(config, keys=None, repeats=10, *, component_size=512, component_batch=8, compare_batch=2,
        compare_size=256, mfu=True, out_dir="", json_out=""):
  """Runs the rows `keys` (default `default_rows()`) in this process, prints the table, writes
  `out_dir`/benchmark.{json,md} and `json_out` when given, and returns the rows."""
  keys = list(keys or default_rows())
  unknown = sorted(set(keys) - set(ALL_ROWS))
  if unknown:
    raise ValueError(f"rows: unknown {unknown}; choose from {ALL_ROWS}")
  start = time.perf_counter()
  bench = Benchmark(config, repeats, component_size, component_batch, compare_batch,
                    compare_size, mfu)
  rows = [row for key in keys for row in bench.run(key)]
  report(rows, repeats, time.perf_counter() - start, out_dir, json_out)
  return rows


def report(rows, repeats, seconds, out_dir, json_out):
  """Prints the table and writes it (JSON and markdown) where asked."""
  add_step_shares(rows)
  info = device_info()
  table = format_table(rows)
  header = (f"Devices: {info['device_count']} x {info['device_kind']} ({info['backend']}), jax "
            f"{info['jax']}; peak bf16 {_fmt(info['peak_bf16_tflops'], '.0f', 'n/a')} TFLOP/s; "
            f"{repeats} timed runs per row; {seconds:.0f} s in all")
  print(f"\n{header}\n{table}", flush=True)
  result = {"device": info, "repeats": repeats, "command": sys.argv, "seconds": seconds,
            "rows": rows}
  write_outputs(result, f"{header}\n\n{table}", out_dir, json_out)


def main(argv):
  del argv
  keys = _ROWS.value or default_rows(_COMPONENTS_ONLY.value)
  if _ISOLATE.value:
    unknown = sorted(set(keys) - set(ALL_ROWS))
    if unknown:
      raise app.UsageError(f"--rows: unknown {unknown}; choose from {ALL_ROWS}")
    start = time.perf_counter()
    rows = run_isolated(sys.argv[1:], keys, _ROW_TIMEOUT.value, _TRAIN_TIMEOUT.value, _BUDGET.value)
    report(rows, _REPEATS.value, time.perf_counter() - start, _OUT_DIR.value, _JSON_OUT.value)
  else:
    run(_CONFIG.value, keys, _REPEATS.value, component_size=_COMPONENT_SIZE.value,
        component_batch=_COMPONENT_BATCH.value, compare_batch=_COMPARE_BATCH.value,
        compare_size=_COMPARE_SIZE.value, mfu=_MFU.value, out_dir=_OUT_DIR.value,
        json_out=_JSON_OUT.value)


if __name__ == "__main__":
  # Flags are defined only when run as a program, so that tests can import this module next to
  # other modules with a --config flag (rsepm_jax.ablate).
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  _ROWS = flags.DEFINE_list("rows", [], f"Rows to run, in this order, from {ALL_ROWS}; empty: all "
                            "but compare, plus compare when torch imports.")
  _REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per row (after one warm-up run).")
  _COMPONENTS_ONLY = flags.DEFINE_bool("components_only", False,
                                       "Skip the train/mix/eval/msflip rows.")
  _COMPONENT_SIZE = flags.DEFINE_integer("component_size", 512, "Crop size for component rows.")
  _COMPONENT_BATCH = flags.DEFINE_integer("component_batch", 8, "Batch for component rows.")
  _COMPARE_BATCH = flags.DEFINE_integer("compare_batch", 2, "Batch of the JAX/PyTorch comparison.")
  _COMPARE_SIZE = flags.DEFINE_integer("compare_size", 256, "Crop size of the JAX/PyTorch comparison.")
  _MFU = flags.DEFINE_bool("mfu", True, "FLOPs (XLA cost analysis), TFLOP/s and MFU columns.")
  _ISOLATE = flags.DEFINE_bool("isolate", False, "Run every row in its own process, under a timeout.")
  _ROW_TIMEOUT = flags.DEFINE_float("row_timeout_s", 0, "With --isolate: seconds per row (0: none).")
  _TRAIN_TIMEOUT = flags.DEFINE_float("train_timeout_s", 0, "With --isolate: seconds for the train "
                                      "and compare rows (0: --row_timeout_s).")
  _BUDGET = flags.DEFINE_float("budget_s", 0, "With --isolate: seconds for all rows together; rows "
                               "that would start past it are skipped (0: no limit).")
  _OUT_DIR = flags.DEFINE_string("out_dir", os.environ.get("OUT", ""), "Folder for benchmark.json "
                                 "and benchmark.md (default $OUT; empty: none).")
  _JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the rows as JSON to this file.")
  jax.config.config_with_absl()
  app.run(main)
