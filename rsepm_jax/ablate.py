r"""Seed-quality ablation on the training split, like the paper's tables, over several seeds.

  python -m rsepm_jax.ablate --config=configs/demo.py:ablation --workdir=/tmp/rsepm_ablation \
      --seeds=0,1,2

Every row is scored after the same number of training steps (the whole schedule). Per seed,
runs share their common prefix: a run that differs from another only from epoch E on continues
a copy of that run's checkpoint at E (R = loss.rs_start_epoch, D = the decoder-source epoch,
M = loss.mix_start_epoch):

  run          continues        rows
  cam          (from scratch)   CAM, CAM+SCG, CAM+PAMR, CAM+SCG+PAMR: classification loss only,
                                for all epochs; SCG / PAMR applied to its final CAM
  rs_cam       cam at R         RS (CAM source): RecurSeed with the CAM as source throughout
  rs_decoder   rs_cam at D      RS (decoder source): the decoder becomes the source at D
  rs_<mix>     base at M        RS+CutMix, RS+ClassMix, RS+EPM: the config's recipe plus mixing
                                (`--mixes` also takes saliency_grafting and cda)
  variants     (as their row)   the config's recipe with one reconstruction knob flipped

"base" is rs_decoder when the config's `loss.decoder_source_epoch` lies inside the schedule,
else rs_cam. D is that epoch, or R + 2 (at most the last epoch) when the config never switches,
so the decoder has trained for two epochs before it becomes the source. The variants (`--variants`)
flip `recurseed.filter_input`, `recurseed.decoder_source_dropout`,
`recurseed.normalize_decoder_source`, `loss.decoder_source_weight` (1 <-> 0.5), `train.bn_stats`,
`mix.mix_targets` and `mix.edge_band`; their rows are named "<row> [key=value]".

Every row gives per-class maps in [0, 1] for the image's tags; the background threshold is
swept as for CAMs (spec 8.2) and the best mIoU is reported with its FP and FN. The table (mean
and sample standard deviation over the seeds) is printed and written to
`workdir/ablation.json` as `{row: {"miou", "miou_std", "fp", "fp_std", "fn", "fn_std", "steps",
"seeds": {seed: {"miou", "fp", "fn", "threshold"}}}}`. Re-running the command resumes any
unfinished run and skips finished ones.
"""
import dataclasses
import functools
import json
from typing import Any, Dict, Optional

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
from rsepm_jax import config_check
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
_MIXES = flags.DEFINE_list(
    "mixes", ["cutmix", "classmix", "epm"],
    "Mixing kinds to compare: cutmix, classmix, epm, saliency_grafting, cda.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (config.seed) to run.")
_OUTPUT = flags.DEFINE_string("output", "ablation.json", "Table file name in --workdir.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["filter_input", "decoder_source_dropout", "normalize_decoder_source",
                 "bn_stats", "mix_targets"],
    "Reconstruction knobs to flip, one run each: filter_input, decoder_source_dropout, "
    "normalize_decoder_source, decoder_source_weight, bn_stats, mix_targets, edge_band "
    "(empty: none).")

CAM_ROWS = ("CAM", "CAM+SCG", "CAM+PAMR", "CAM+SCG+PAMR")
MIX_ROW_NAMES = {"cutmix": "RS+CutMix", "classmix": "RS+ClassMix", "epm": "RS+EPM",
                 "saliency_grafting": "RS+SaliencyGrafting", "cda": "RS+CDA"}


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


VARIANTS = {  # --variants name -> (config key, its two values)
    "filter_input": ("recurseed.filter_input", ("source", "refined")),
    "decoder_source_dropout": ("recurseed.decoder_source_dropout", (False, True)),
    "normalize_decoder_source": ("recurseed.normalize_decoder_source", (False, True)),
    "decoder_source_weight": ("loss.decoder_source_weight", (1.0, 0.5)),
    "bn_stats": ("train.bn_stats", ("both", "clean")),
    "mix_targets": ("mix.mix_targets", ("completed", "seeds")),
    "edge_band": ("mix.edge_band", ("pasted_edges", "label_change")),
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the ablation: `overrides` on the config, continuing `parent`."""
  name: str  # folder under the seed's workdir
  parent: Optional[str]  # run whose checkpoint at `fork_epoch` this run continues; None: scratch
  fork_epoch: int
  overrides: Dict[str, Any]  # dotted config key -> value
  rows: Dict[str, str]  # table row -> what `row_scores` computes ("RS" or a CAM row)


def _get(config, key):
  return functools.reduce(getattr, key.split("."), config)


def _with_overrides(config, overrides):
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    setattr(functools.reduce(getattr, parents, config), leaf, value)
  return config


def plan_runs(config, mix_kinds=("cutmix", "classmix", "epm"), variants=()):
  """The runs of one seed, parents first (see the module docstring)."""
  unknown = [kind for kind in mix_kinds if kind not in MIX_ROW_NAMES]
  if unknown:
    raise ValueError(f"Unknown mixing kinds {unknown}; expected some of {sorted(MIX_ROW_NAMES)}.")
  unknown = [name for name in variants if name not in VARIANTS]
  if unknown:
    raise ValueError(f"Unknown variants {unknown}; expected some of {sorted(VARIANTS)}.")
  epochs, rs_start = config.train.num_epochs, config.loss.rs_start_epoch
  mix_start = config.loss.mix_start_epoch
  if not 0 < rs_start <= mix_start < epochs:
    raise ValueError(
        "The ablation needs 0 < loss.rs_start_epoch <= loss.mix_start_epoch < train.num_epochs; "
        f"got {rs_start}, {mix_start}, {epochs}.")
  uses_decoder = rs_start <= config.loss.decoder_source_epoch < epochs
  decoder_epoch = (config.loss.decoder_source_epoch if uses_decoder
                   else min(rs_start + 2, epochs - 1))
  no_mix = {"mix.kind": "none"}
  rs_cam = {**no_mix, "loss.decoder_source_epoch": epochs}
  rs_decoder = {**no_mix, "loss.decoder_source_epoch": decoder_epoch}
  base, base_row, base_overrides = (("rs_decoder", "RS (decoder source)", rs_decoder) if uses_decoder
                                    else ("rs_cam", "RS (CAM source)", rs_cam))
  runs = [
      Run("cam", None, 0, {**no_mix, "loss.rs_start_epoch": epochs}, {r: r for r in CAM_ROWS}),
      Run("rs_cam", "cam", rs_start, rs_cam, {"RS (CAM source)": "RS"}),
      Run("rs_decoder", "rs_cam", decoder_epoch, rs_decoder, {"RS (decoder source)": "RS"}),
  ]
  mix_overrides = {kind: {**base_overrides, "mix.kind": kind} for kind in MIX_ROW_NAMES}
  for kind in mix_kinds:
    runs.append(Run(f"rs_{kind}", base, mix_start, mix_overrides[kind], {MIX_ROW_NAMES[kind]: "RS"}))
  for name in variants:
    key, values = VARIANTS[name]
    flipped = values[1] if _get(config, key) == values[0] else values[0]
    if key.startswith("mix.") or key == "train.bn_stats":
      parent, fork, row, overrides = base, mix_start, "RS+EPM", mix_overrides["epm"]
    elif key in ("recurseed.decoder_source_dropout", "recurseed.normalize_decoder_source",
                 "loss.decoder_source_weight"):
      parent, fork, row, overrides = "rs_cam", decoder_epoch, "RS (decoder source)", rs_decoder
    else:
      parent, fork, row, overrides = "cam", rs_start, base_row, base_overrides
    runs.append(Run(f"variant_{name}", parent, fork, {**overrides, key: flipped},
                    {f"{row} [{key}={flipped}]": "RS"}))
  return runs


def ablation_config(config, overrides):
  """`config` with `overrides` and a checkpoint kept at every epoch boundary."""
  config = _with_overrides(config, overrides)
  steps_per_epoch, _ = train.schedule_lengths(config)
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
    raise FileNotFoundError(f"Checkpoint {source} to continue the run {workdir} from is missing.")
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


def run_seed(config, workdir, runs):
  """Trains (or resumes) every run of one seed; returns ({row: scores}, final step)."""
  root = epath.Path(workdir)
  results, total_steps = {}, None
  for run in runs:
    run_config = ablation_config(config, run.overrides)
    steps_per_epoch, total_steps = train.schedule_lengths(run_config)
    run_dir = str(root / run.name)
    if run.parent is not None:
      fork_run(str(root / run.parent), run.fork_epoch * steps_per_epoch, run_dir)
    logging.info("Ablation run %s (seed %d): %s", run.name, config.seed, run.overrides)
    # A forked run continues its parent's checkpoint with other phase epochs on purpose.
    train.train_and_evaluate(run_config, run_dir, allow_config_change=run.parent is not None)
    scores = score_rows(run_config, run_dir, None, tuple(run.rows.values()))
    results.update({row: scores[kind] for row, kind in run.rows.items()})
  return results, total_steps


def summarize(per_seed, steps):
  """{row: mean and sample std over seeds, steps, per-seed scores} in row order."""
  summary = {}
  for row in next(iter(per_seed.values())):
    values = {seed: scores[row] for seed, scores in per_seed.items()}
    entry = {}
    for metric in ("miou", "fp", "fn"):
      column = np.array([v[metric] for v in values.values()])
      entry[metric] = float(column.mean())
      entry[f"{metric}_std"] = float(column.std(ddof=1)) if len(column) > 1 else 0.0
    summary[row] = {**entry, "steps": steps, "seeds": {str(k): v for k, v in values.items()}}
  return summary


def format_ablation(summary):
  seeds = list(next(iter(summary.values()))["seeds"]) if summary else []
  lines = ["| seeds (train split) | mIoU mean +- std | FP | FN | " +
           " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(seeds)]
  for row, entry in summary.items():
    per_seed = " | ".join(f"{100 * entry['seeds'][s]['miou']:.1f}" for s in seeds)
    lines.append(f"| {row} | {100 * entry['miou']:.1f} +- {100 * entry['miou_std']:.1f} "
                 f"| {entry['fp']:.3f} | {entry['fn']:.3f} | {per_seed} |")
  return "\n".join(lines)


def run_ablation(config, workdir, mix_kinds=("cutmix", "classmix", "epm"), seeds=(0,),
                 variants=(), output="ablation.json"):
  """Trains every run of every seed (resuming), scores the rows, writes `workdir/output`."""
  runs = plan_runs(config, mix_kinds, variants)
  root = epath.Path(workdir)
  per_seed, steps = {}, None
  for seed in seeds:
    seed_config = config.copy_and_resolve_references()
    seed_config.seed = seed
    per_seed[seed], steps = run_seed(seed_config, str(root / f"seed_{seed}"), runs)
  summary = summarize(per_seed, steps)
  if jax.process_index() == 0:
    (root / output).write_text(json.dumps(summary, indent=2))
  logging.info("Seed ablation on %s, %d steps per row, seeds %s:\n%s", config.data.train_split,
               steps, list(seeds), format_ablation(summary))
  return summary


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  checkpoint.quiet_library_logs()
  parallel.maybe_initialize_distributed()
  # Runs of different seeds compile the same programs: keep them on disk.
  jax.config.update("jax_compilation_cache_dir",
                    str(epath.Path(_WORKDIR.value) / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  run_ablation(_CONFIG.value, _WORKDIR.value, tuple(_MIXES.value),
               tuple(int(seed) for seed in _SEEDS.value), tuple(_VARIANTS.value), _OUTPUT.value)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=config_check.parse_flags)
