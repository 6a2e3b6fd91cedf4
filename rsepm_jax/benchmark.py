"""Speed table: the train step, the eval forward pass and the refinement components.

  python -m rsepm_jax.benchmark --config=configs/demo.py
  python -m rsepm_jax.benchmark --config=configs/voc.py --repeats=20 --components_only

Everything is compiled once, then timed over `--repeats` runs (after one warm-up run); the
table gives the median, the spread (10th-90th percentile) and images/s. The train step runs
with every phase active (RecurSeed and the configured mixing), on the config's crop size and
global batch. The components run at the sizes of a 512 crop (PAMR on a 128x128 stride-4 grid
with 21 channels, SCG on the 32x32 stride-16 grid, Canny and EPM on 512x512 images) unless
`--component_size` says otherwise. With PyTorch installed, PAMR is also timed in a PyTorch
implementation following the official module (unfold-based, NCHW) for the ratio.
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from rsepm_jax import optimizer
from rsepm_jax import parallel
from rsepm_jax import state as state_lib
from rsepm_jax import train_step
from rsepm_jax.evaluate import make_eval_step
from rsepm_jax.refine import canny
from rsepm_jax.refine import edge_predict_mix
from rsepm_jax.refine import pamr
from rsepm_jax.refine import scg

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per row.")
_COMPONENTS_ONLY = flags.DEFINE_bool("components_only", False, "Skip the train/eval rows.")
_COMPONENT_SIZE = flags.DEFINE_integer("component_size", 512, "Crop size for component rows.")
_COMPONENT_BATCH = flags.DEFINE_integer("component_batch", 8, "Batch for component rows.")


def time_call(fn, args, repeats):
  """(compile seconds, list of run seconds) of `fn(*args)`; `fn` is jitted or a plain callable."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile() if hasattr(fn, "lower") else fn
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  return compile_s, runs


def _row(name, images, compile_s, runs):
  median = float(np.median(runs))
  p10, p90 = np.percentile(runs, [10, 90])
  return {"name": name, "median_ms": 1e3 * median, "spread_ms": (1e3 * p10, 1e3 * p90),
          "images_per_s": images / median if images else None, "compile_s": compile_s}


def _peak_memory():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return f"{peak / 2**30:.2f} GiB" if peak else "n/a (backend does not report)"


def model_rows(config, repeats):
  """Train step (all phases on) and eval forward pass on the config's shapes."""
  config = config.copy_and_resolve_references()
  config.loss.rs_start_epoch = config.loss.decoder_source_epoch = config.loss.mix_start_epoch = 0
  mesh = parallel.make_mesh()
  batch_size = config.train.global_batch_size
  size = config.data.crop_size
  model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
  tx = optimizer.make_optimizer(config.optim, total_steps=1000)
  state = state_lib.create_train_state(model, tx, config, state_lib.prng_key(0), mesh)
  rng = np.random.default_rng(0)
  labels = (rng.random((batch_size, config.data.num_classes)) < 0.3).astype(np.float32)
  labels[:, 0] = 1.0
  host_batch = {
      "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
      "mask": np.zeros((batch_size, size, size), np.uint8),
      "labels": labels,
      "crop_box": np.tile(np.array([[0, 0, size, size]], np.int32), (batch_size, 1)),
  }
  batch = parallel.to_global(host_batch, mesh)
  step = train_step.make_train_step(model, tx, config, mesh, total_steps=1000, steps_per_epoch=1)
  step_rng = jax.device_put(state_lib.prng_key(1), parallel.replicated(mesh))

  # The step donates its state: feed each run the previous output.
  holder = {"state": state}

  def run_step(batch, rng):
    holder["state"], metrics = compiled_step(holder["state"], batch, rng)
    return metrics

  start = time.perf_counter()
  compiled_step = step.lower(state, batch, step_rng).compile()
  compile_s = time.perf_counter() - start
  _, runs = time_call(run_step, (batch, step_rng), repeats)
  rows = [_row(f"train step (RS + {config.mix.kind}), batch {batch_size} x {size}px",
               batch_size, compile_s, runs)]

  if config.mix.kind != "none":
    mask_size = size // 4
    seeds = jnp.asarray(rng.integers(0, config.data.num_classes + 1, (batch_size, mask_size, mask_size)),
                        jnp.int32)
    probs = jax.nn.one_hot(seeds, config.data.num_classes + 1)
    settings = train_step.mix_settings(config)
    mix_fn = jax.jit(lambda key, im, sd, pr: edge_predict_mix.mix_batch(
        key, im, sd, pr, jnp.asarray(labels), jnp.asarray(host_batch["crop_box"]), settings))
    images = train_step.model_inputs({k: jnp.asarray(v) for k, v in host_batch.items()})
    mix_row = _row(f"{config.mix.kind} mix_batch on that batch", batch_size,
                   *time_call(mix_fn, (state_lib.prng_key(2), images, seeds, probs), repeats))
    mix_row["name"] += f" ({100 * mix_row['median_ms'] / rows[0]['median_ms']:.0f}% of the step)"
    rows.append(mix_row)

  eval_batch = parallel.to_global({**host_batch, "valid": np.ones(batch_size, bool)}, mesh)
  eval_step = make_eval_step(model, config.data.num_classes, jnp.linspace(0.1, 0.8, 15), mesh)
  variables = state_lib.eval_variables(holder["state"])
  compile_s, runs = time_call(eval_step, (variables, eval_batch), repeats)
  rows.append(_row(f"eval forward + CAM sweep, batch {batch_size} x {size}px",
                   batch_size, compile_s, runs))
  return rows


def component_rows(config, repeats, size, batch):
  """PAMR, SCG, Canny and EPM at the sizes of a `size` crop."""
  rng = np.random.default_rng(0)
  mask_size, grid = size // 4, size // 16
  num_classes = 20
  image = jnp.asarray(rng.normal(size=(batch, mask_size, mask_size, 3)), jnp.float32)
  masks = jax.nn.softmax(jnp.asarray(rng.normal(size=(batch, mask_size, mask_size, num_classes + 1)),
                                     jnp.float32), axis=-1)
  rs = config.recurseed
  pamr_fn = jax.jit(lambda im, m: pamr.pamr(im, m, num_iter=rs.pamr_iter,
                                            dilations=tuple(rs.pamr_dilations), sigma=rs.pamr_sigma))
  rows = [_row(f"PAMR {batch}x{mask_size}x{mask_size}x{num_classes + 1}, {rs.pamr_iter} iters, "
               f"dilations {tuple(rs.pamr_dilations)}", batch, *time_call(pamr_fn, (image, masks), repeats))]
  torch_runs = _torch_pamr_runs(np.asarray(image), np.asarray(masks), rs, repeats)
  if torch_runs:
    rows.append(_row("PAMR, PyTorch reference implementation (same CPU)", batch, 0.0, torch_runs))

  scores = jnp.asarray(rng.random((batch, grid, grid, num_classes)), jnp.float32)
  features = [jnp.asarray(rng.normal(size=(batch, grid, grid, d)), jnp.float32) for d in (1024, 2048)]
  scg_fn = jax.jit(lambda s, f: scg.scg(s, f))
  rows.append(_row(f"SCG {batch}x{grid}x{grid}, D=1024+2048, C={num_classes}", batch,
                   *time_call(scg_fn, (scores, features), repeats)))

  gray = jnp.asarray(rng.integers(0, 256, (batch, size, size)), jnp.float32)
  gray = jax.image.resize(gray, (batch, size, size), "linear")  # some structure, not pure noise
  canny_fn = jax.jit(lambda g: canny.canny(g, 10.0, 100.0, 5))
  rows.append(_row(f"Canny {batch}x{size}x{size}", batch, *time_call(canny_fn, (gray,), repeats)))

  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  seeds = jnp.asarray(np.argmax(np.asarray(masks), -1), jnp.int32)
  labels = jnp.ones((batch, num_classes), jnp.float32)
  box = jnp.tile(jnp.array([[0, 0, size, size]], jnp.int32), (batch, 1))
  settings = edge_predict_mix.MixSettings(**config.mix.to_dict()) if config.mix.kind != "none" \
      else edge_predict_mix.MixSettings()
  mix_fn = jax.jit(lambda key, im, sd, pr: edge_predict_mix.mix_batch(key, im, sd, pr, labels, box, settings))
  rows.append(_row(f"{settings.kind} mix_batch {batch}x{size}px (edges: {settings.edge_source})", batch,
                   *time_call(mix_fn, (state_lib.prng_key(0), images, seeds, masks), repeats)))
  return rows


def _torch_pamr_runs(image, masks, rs, repeats):
  """PAMR in PyTorch the way the official module computes it (unfold per dilation, NCHW)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  dilations, sigma = tuple(rs.pamr_dilations), rs.pamr_sigma

  def neighbours(x, include_centre):
    """[B, C, K, H, W] neighbour values for every dilation, replicate padding."""
    views = []
    for d in dilations:
      padded = F.pad(x, [d, d, d, d], mode="replicate")
      patches = F.unfold(padded, 3, dilation=d).view(x.shape[0], x.shape[1], 9, *x.shape[2:])
      views.append(patches if include_centre else patches[:, :, [0, 1, 2, 3, 5, 6, 7, 8]])
    return torch.cat(views, dim=2)

  def run(image_nchw, mask_nchw):
    with torch.no_grad():
      std = neighbours(image_nchw, True).std(dim=2, keepdim=True)
      affinity = -(neighbours(image_nchw, False) - image_nchw.unsqueeze(2)).abs() / (1e-8 + sigma * std)
      weights = F.softmax(affinity.mean(dim=1, keepdim=True), dim=2)
      for _ in range(rs.pamr_iter):
        mask_nchw = (neighbours(mask_nchw, False) * weights).sum(dim=2)
      return mask_nchw

  image_nchw = torch.from_numpy(np.array(image)).permute(0, 3, 1, 2).contiguous()
  mask_nchw = torch.from_numpy(np.array(masks)).permute(0, 3, 1, 2).contiguous()
  run(image_nchw, mask_nchw)
  runs = []
  for _ in range(max(repeats // 2, 2)):
    start = time.perf_counter()
    run(image_nchw, mask_nchw)
    runs.append(time.perf_counter() - start)
  return runs


def format_table(rows, reference=None):
  """Markdown table; `reference` names the row the ratio column divides by."""
  by_name = {row["name"]: row for row in rows}
  lines = ["| what | median ms | p10-p90 ms | images/s | compile s | ratio |",
           "|---|---:|---:|---:|---:|---:|"]
  for row in rows:
    ratio = ""
    if reference and reference(row) in by_name:
      ratio = f"{by_name[reference(row)]['median_ms'] / row['median_ms']:.1f}x"
    ips = f"{row['images_per_s']:.1f}" if row["images_per_s"] else ""
    lines.append(f"| {row['name']} | {row['median_ms']:.1f} | {row['spread_ms'][0]:.1f}-"
                 f"{row['spread_ms'][1]:.1f} | {ips} | {row['compile_s']:.1f} | {ratio} |")
  return "\n".join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  rows = [] if _COMPONENTS_ONLY.value else model_rows(config, _REPEATS.value)
  rows += component_rows(config, _REPEATS.value, _COMPONENT_SIZE.value, _COMPONENT_BATCH.value)
  names = {row["name"] for row in rows}
  torch_name = "PAMR, PyTorch reference implementation (same CPU)"

  def reference(row):
    if row["name"].startswith("PAMR ") and torch_name in names:
      return torch_name  # speed-up of ours over the PyTorch PAMR
    return None

  print(f"\nDevices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"peak device memory: {_peak_memory()}")
  print(format_table(rows, reference))


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
