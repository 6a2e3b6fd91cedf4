r"""The multi-stage chain as one resumable command (spec 9): RS+EPM, its pseudo labels (refined by
IRNet's random walk with `--rw_config`), DeepLab trained on them, the paper's evaluation.

  python -m rsepm_jax.pipeline --workdir=DIR \
      --config=configs/voc.py --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.model.init_from=/weights/resnet50.pth \
      --rw_config=configs/voc_rw.py --rw_config.data.root=/data/VOCdevkit/VOC2012 \
      --rw_config.model.init_from=/weights/resnet50.pth \
      --seg_config=configs/voc_deeplab.py --seg_config.data.root=/data/VOCdevkit/VOC2012 \
      --seg_config.model.init_from=/weights/resnet101.pth

Stages, in this order, each in its own folder of DIR and skipped when its output is complete:

  rsepm        `--config`'s single-stage training          DIR/rsepm (done.json when complete)
  export       without --rw_config: its pseudo labels of config.export.split by the paper's
               protocol (multi-scale + flip, GT tags, dense CRF unless --config.export.crf=False)
                                                     DIR/rsepm/pseudo_labels/<split>/<id>.png
  confident    with --rw_config: IRNet's confident labels of the same seeds (config.affinity)
                                                     DIR/rsepm/confident_labels/<split>/<id>.png
  affinity     with --rw_config: the boundary network trained on them      DIR/affinity
  random_walk  with --rw_config: the seeds propagated by the random walk (config.rw)
                                                     DIR/random_walk/<split>/<id>.png
  deeplab      `--seg_config`'s network (deeplabv3plus or deeplabv2) trained on the labels of
               export or random_walk                                        DIR/deeplab
  eval         that network scored on seg_config's eval split by the paper's protocol
                                                     DIR/deeplab/eval/step_<N>_paper.json

Label stages leave DIR/<stage>_done.json when every host has written its share. A preempted or
killed pipeline continues where it stopped when the same command is run again: complete stages
are skipped, the stage that was running resumes (training from its latest checkpoint, label
writing from the PNGs already written). `--stages=deeplab,eval` runs a subset; each stage needs
the outputs of the ones before it. The labels are of config.export.split, which must be
seg_config.data.train_split (and rw_config.data.train_split).
"""
import json

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags

from rsepm_jax import checkpoint
from rsepm_jax import cli_errors
from rsepm_jax import config_check
from rsepm_jax import export
from rsepm_jax import parallel
from rsepm_jax import random_walk_export
from rsepm_jax import train

STAGES = ("rsepm", "export", "confident", "affinity", "random_walk", "deeplab", "eval")
RANDOM_WALK_STAGES = ("confident", "affinity", "random_walk")


def folders(workdir, config):
  """The chain's folders under `workdir`."""
  root, split = epath.Path(workdir), config.export.split
  return {"root": root, "rsepm": root / "rsepm", "affinity": root / "affinity",
          "deeplab": root / "deeplab",
          "export": root / "rsepm" / "pseudo_labels" / split,
          "confident": root / "rsepm" / "confident_labels" / split,
          "random_walk": root / "random_walk" / split}


def stage_configs(config, rw_config, seg_config, paths):
  """The configs as the chain runs them: the exports with the paper's or IRNet's protocol, the
  boundary network trained on the confident labels, the stage-2 network trained on the labels
  of the last label stage and evaluated by the paper's protocol. `rw_config` may be None."""
  if seg_config.model.arch not in ("deeplabv3plus", "deeplabv2"):
    raise config_check.ConfigError(
        f"--seg_config.model.arch={seg_config.model.arch!r}: the second stage trains "
        "deeplabv3plus or deeplabv2 (e.g. --seg_config=configs/voc_deeplab.py).")
  if rw_config is not None and rw_config.model.arch != "affinity":
    raise config_check.ConfigError(
        f"--rw_config.model.arch={rw_config.model.arch!r}: the random walk's boundary network "
        "is 'affinity' (e.g. --rw_config=configs/voc_rw.py).")
  for name, other in (("seg_config", seg_config), ("rw_config", rw_config)):
    if other is not None and other.data.train_split != config.export.split:
      raise config_check.ConfigError(
          f"--{name}.data.train_split={other.data.train_split!r} but the labels are of "
          f"--config.export.split={config.export.split!r}; make them equal.")
  config, seg_config = config.copy_and_resolve_references(), seg_config.copy_and_resolve_references()
  with seg_config.unlocked():
    seg_config.data.train_mask_dir = str(paths["export" if rw_config is None else "random_walk"])
    seg_config.eval.protocol = "paper"
  if rw_config is not None:
    rw_config = rw_config.copy_and_resolve_references()
    with rw_config.unlocked():
      rw_config.data.train_mask_dir = str(paths["confident"])
  return config, rw_config, seg_config


def _with_protocol(config, protocol):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.export.protocol = protocol
  return config


def _mark_done(paths, stage, split):
  """`DIR/<stage>_done.json` once every host has written its share of `split`."""
  parallel.wait_for_all_processes(f"pipeline_{stage}_done")
  if jax.process_index() == 0:
    count = len(list(paths[stage].glob("*.png")))
    (paths["root"] / f"{stage}_done.json").write_text(json.dumps({"split": split, "pngs": count}))


def _completed(path, stage):
  if path.exists():
    logging.info("Pipeline: stage %s is complete (%s); skipped.", stage, path)
    return True
  return False


def run(config, seg_config, workdir, stages=STAGES, rw_config=None):
  """Runs `stages` of the chain in `workdir` (the random-walk stages only with `rw_config`, the
  export only without); returns the paper-protocol results of the stage-2 network when the eval
  stage ran, {"preempted": stage} when a training was preempted, else {}."""
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise config_check.ConfigError(f"--stages: unknown {unknown}; choose from {STAGES}.")
  paths = folders(workdir, config)
  config, rw_config, seg_config = stage_configs(config, rw_config, seg_config, paths)
  for checked in (config, rw_config, seg_config):
    if checked is not None:
      config_check.validate(checked)
  skipped = ("export",) if rw_config is not None else RANDOM_WALK_STAGES
  split, results = config.export.split, {}
  for stage in (s for s in STAGES if s in stages and s not in skipped):
    logging.info("Pipeline: stage %s.", stage)
    if stage in ("rsepm", "affinity", "deeplab"):
      stage_config = {"rsepm": config, "affinity": rw_config, "deeplab": seg_config}[stage]
      if not _completed(paths[stage] / "done.json", stage):
        if "preempted_at_step" in train.train_and_evaluate(stage_config, str(paths[stage])):
          return {"preempted": stage}
    elif stage in ("export", "confident"):
      if not _completed(paths["root"] / f"{stage}_done.json", stage):
        export.export_pseudo_labels(_with_protocol(config, "paper" if stage == "export" else stage),
                                    str(paths["rsepm"]))
        _mark_done(paths, stage, split)
    elif stage == "random_walk":
      if not _completed(paths["root"] / "random_walk_done.json", stage):
        random_walk_export.export_random_walk(config, str(paths["rsepm"]), rw_config,
                                              str(paths["affinity"]), str(paths["random_walk"]))
        _mark_done(paths, stage, split)
    else:  # eval
      done = paths["deeplab"] / "done.json"
      step = json.loads(done.read_text())["step"] if done.exists() else None
      result_file = paths["deeplab"] / "eval" / f"step_{step}_paper.json"
      if step is None or not _completed(result_file, stage):
        results = train.evaluate_checkpoint(seg_config, str(paths["deeplab"]))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  checkpoint.quiet_library_logs()
  parallel.maybe_initialize_distributed()
  with cli_errors.one_line_errors():
    run(_CONFIG.value, _SEG_CONFIG.value, _WORKDIR.value, tuple(_STAGES.value), _RW_CONFIG.value)


if __name__ == "__main__":
  # Flags are defined only when run as a program, so that tests can import this module next to
  # other modules with a --config flag (rsepm_jax.ablate).
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Single-stage config, e.g. configs/voc.py.", lock_config=True)
  _RW_CONFIG = config_flags.DEFINE_config_file(
      "rw_config", None, "Boundary-network config of the random walk, e.g. configs/voc_rw.py; "
      "without it DeepLab trains on the paper's pseudo labels directly.", lock_config=True)
  _SEG_CONFIG = config_flags.DEFINE_config_file(
      "seg_config", None, "Stage-2 config, e.g. configs/voc_deeplab.py.", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the whole chain.")
  _STAGES = flags.DEFINE_list("stages", list(STAGES), f"Stages to run, from {STAGES}.")
  flags.mark_flags_as_required(["config", "seg_config", "workdir"])
  jax.config.config_with_absl()
  app.run(main, flags_parser=config_check.parse_flags)
