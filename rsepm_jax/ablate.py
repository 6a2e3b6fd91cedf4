r"""Seed-quality ablation on the training split, like the paper's tables.

  python -m rsepm_jax.ablate --config=configs/demo.py --workdir=/tmp/rsepm_ablation

One training run with `config.mix.kind = "none"` gives the recursion rows; its checkpoint at
the end of the CAM-only warm-up (`loss.rs_start_epoch`) gives the rows without recursion.
Each mixing kind then continues a copy of that run from its `loss.mix_start_epoch` checkpoint,
so every row shares the same warm-up and RecurSeed prefix:

  CAM            normalised CAM of the warm-up model
  CAM+SCG        + SCG expansion (spec 2)
  CAM+PAMR       + PAMR refinement at stride 4 (spec 3)
  CAM+SCG+PAMR   both, one round, no recursion
  RS             the decoder seeds of the model trained with RecurSeed (spec 8.1 step 3)
  RS+CutMix, RS+ClassMix, RS+EPM   the same, trained with that mixing from mix_start_epoch

Every row gives per-class maps in [0, 1] for the image's tags; the background threshold is
swept as for CAMs (spec 8.2) and the best mIoU is reported with its FP and FN. The table is
printed and written to `workdir/ablation.json` as `{row: {"miou", "fp", "fn", "threshold"}}`.
Re-running the command resumes any unfinished training run.
"""
import dataclasses
import json

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from rsepm_jax import checkpoint
from rsepm_jax import evaluate
from rsepm_jax import image_ops
from rsepm_jax import metrics
from rsepm_jax import parallel
from rsepm_jax import train
from rsepm_jax import train_step
from rsepm_jax.data import pipeline
from rsepm_jax.refine import recurseed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and ablation.json.")
_MIXES = flags.DEFINE_list("mixes", ["cutmix", "classmix", "epm"], "Mixing kinds to compare.")

CAM_ROWS = ("CAM", "CAM+SCG", "CAM+PAMR", "CAM+SCG+PAMR")
MIX_ROW_NAMES = {"cutmix": "RS+CutMix", "classmix": "RS+ClassMix", "epm": "RS+EPM"}


def row_scores(row, outputs, images, labels, settings):
  """Per-class seed maps `[B, h, w, C]` in [0, 1] (absent classes 0) for one ablation row.

  Args:
    row: a name from `CAM_ROWS` or "RS".
    outputs: the model's outputs (`cams`, `features`, `seg_logits`).
    images: [B, H, W, 3] normalised model inputs.
    labels: [B, C] image tags.
    settings: `recurseed.Settings` (SCG and PAMR knobs).
  """
  if row not in CAM_ROWS + ("RS",):
    raise ValueError(f"Unknown ablation row {row!r}; expected one of {CAM_ROWS + ('RS',)}.")
  cams = outputs["cams"].astype(jnp.float32)
  mask_size = outputs["seg_logits"].shape[1:3]
  tags = labels[:, None, None, :]
  if row == "RS":
    return recurseed.decoder_source(outputs["seg_logits"], labels, mask_size)
  source = recurseed.cam_source(cams, labels)
  if row == "CAM":
    return source
  features = recurseed.scg_features(outputs["features"], settings.scg_levels, cams.shape[1:3])
  if row == "CAM+SCG":
    return recurseed.scg(source, features, settings) * tags
  settings = dataclasses.replace(settings, use_scg=row == "CAM+SCG+PAMR", use_pamr=True, rounds=1)
  mask_image = image_ops.resize_bilinear_align_corners(images, mask_size)
  probs = recurseed.refine(source, features, mask_image, labels, settings)
  return recurseed.max_normalize(probs[..., 1:]) * tags


def make_seed_step(model, rows, settings, num_classes, thresholds, mesh):
  """Jitted `(variables, batch) -> {row: int32 [T, K, K]}` threshold-sweep confusions."""

  def seed_step(variables, batch):
    images = train_step.model_inputs(batch)
    outputs = model.apply(variables, images, train=False)
    size = batch["image"].shape[1:3]
    gt = batch["mask"].astype(jnp.int32)
    valid = batch["valid"][:, None, None] & (gt != 255)
    confusions = {}
    for row in rows:
      scores = row_scores(row, outputs, images, batch["labels"], settings)
      scores = image_ops.resize_bilinear(scores, size)
      confusions[row] = metrics.threshold_sweep_confusions(
          scores, batch["labels"], gt, thresholds, num_classes + 1, valid=valid)
    return confusions

  return jax.jit(seed_step, out_shardings=parallel.replicated(mesh))


def score_rows(config, workdir, step, rows):
  """Best-threshold {row: {"miou", "fp", "fn", "threshold"}} of the checkpoint `step` in `workdir`."""
  mesh = parallel.make_mesh()
  model, variables, _ = train.restore_for_inference(config, workdir, mesh, step)
  thresholds = evaluate.cam_thresholds(config.eval)
  seed_step = make_seed_step(model, rows, train_step.recurseed_settings(config),
                             config.data.num_classes, jnp.asarray(thresholds, jnp.float32), mesh)
  totals = {}
  for host_batch in pipeline.eval_batches(config.data, config.data.train_split,
                                          config.eval.global_batch_size):
    arrays = {k: v for k, v in host_batch.items() if k != "id"}
    for row, value in seed_step(variables, parallel.to_global(arrays, mesh)).items():
      totals[row] = metrics.accumulate(totals.get(row, np.zeros(value.shape, np.int64)), value)
  results = {}
  for row in rows:
    best = metrics.best_threshold(totals[row], thresholds)
    results[row] = {k: float(best[k]) for k in ("miou", "fp", "fn", "threshold")}
  return results


def ablation_config(config, mix_kind):
  """`config` with `mix.kind` set and a checkpoint kept at every epoch boundary."""
  config = config.copy_and_resolve_references()
  steps_per_epoch, _ = train.schedule_lengths(config)
  config.mix.kind = mix_kind
  config.train.checkpoint_every = steps_per_epoch
  config.train.max_checkpoints = config.train.num_epochs + 1
  return config


def fork_run(source_workdir, step, workdir):
  """Starts `workdir` from the checkpoint `step` of `source_workdir` (unless already started)."""
  target = epath.Path(workdir) / "checkpoints"
  if target.exists() and any(target.iterdir()):
    return
  source = epath.Path(source_workdir) / "checkpoints" / str(step)
  if not source.exists():
    raise FileNotFoundError(f"Checkpoint {source} to continue the mixing runs from is missing.")
  if jax.process_index() == 0:
    _copy_tree(source, target / str(step))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"ablation fork {workdir}")  # copy done before restore


def _copy_tree(source, target):
  target.mkdir(parents=True, exist_ok=True)
  for child in source.iterdir():
    if child.is_dir():
      _copy_tree(child, target / child.name)
    else:
      child.copy(target / child.name)


def format_ablation(results):
  lines = ["| seeds (train split) | mIoU | FP | FN | bg threshold |", "|---|---:|---:|---:|---:|"]
  for row, scores in results.items():
    lines.append(f"| {row} | {100 * scores['miou']:.1f} | {scores['fp']:.3f} | {scores['fn']:.3f} "
                 f"| {scores['threshold']:.2f} |")
  return "\n".join(lines)


def run_ablation(config, workdir, mix_kinds=("cutmix", "classmix", "epm")):
  """Trains the runs (resuming any unfinished one), scores every row, writes ablation.json."""
  unknown = [kind for kind in mix_kinds if kind not in MIX_ROW_NAMES]
  if unknown:
    raise ValueError(f"Unknown mixing kinds {unknown}; expected some of {sorted(MIX_ROW_NAMES)}.")
  root = epath.Path(workdir)
  rs_config = ablation_config(config, "none")
  steps_per_epoch, _ = train.schedule_lengths(rs_config)
  warmup_end = rs_config.loss.rs_start_epoch * steps_per_epoch
  mix_start = max(rs_config.loss.mix_start_epoch, rs_config.loss.rs_start_epoch) * steps_per_epoch
  if not 0 < warmup_end <= mix_start < steps_per_epoch * rs_config.train.num_epochs:
    raise ValueError(
        "The ablation needs 0 < loss.rs_start_epoch <= loss.mix_start_epoch < train.num_epochs; "
        f"got {rs_config.loss.rs_start_epoch}, {rs_config.loss.mix_start_epoch}, "
        f"{rs_config.train.num_epochs}.")

  rs_dir = str(root / "rs")
  train.train_and_evaluate(rs_config, rs_dir)
  results = score_rows(rs_config, rs_dir, warmup_end, CAM_ROWS)
  results.update(score_rows(rs_config, rs_dir, None, ("RS",)))
  for kind in mix_kinds:
    mix_config = ablation_config(config, kind)
    mix_dir = str(root / f"rs_{kind}")
    fork_run(rs_dir, mix_start, mix_dir)
    train.train_and_evaluate(mix_config, mix_dir)
    results[MIX_ROW_NAMES[kind]] = score_rows(mix_config, mix_dir, None, ("RS",))["RS"]

  if jax.process_index() == 0:
    (root / "ablation.json").write_text(json.dumps(results, indent=2))
  logging.info("Seed ablation on %s:\n%s", config.data.train_split, format_ablation(results))
  return results


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  checkpoint.quiet_library_logs()
  parallel.maybe_initialize_distributed()
  run_ablation(_CONFIG.value, _WORKDIR.value, tuple(_MIXES.value))


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
