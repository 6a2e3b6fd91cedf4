r"""The multi-stage chain as one resumable command (spec 9): RS+EPM, its pseudo labels, DeepLab.

  python -m rsepm_jax.pipeline --workdir=DIR \
      --config=configs/voc.py --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.model.init_from=/weights/resnet50.pth \
      --seg_config=configs/voc_deeplab.py --seg_config.data.root=/data/VOCdevkit/VOC2012 \
      --seg_config.model.init_from=/weights/resnet101.pth

Stages, in this order, each in its own folder of DIR and skipped when its output is complete:

  rsepm    `--config`'s single-stage training            DIR/rsepm (done.json when complete)
  export   its pseudo labels of config.export.split with the paper's protocol (multi-scale + flip,
           GT tags, dense CRF unless --config.export.crf=False)
                                                          DIR/rsepm/pseudo_labels/<split>/<id>.png
                                                          (DIR/export_done.json when complete)
  deeplab  `--seg_config`'s network (model.arch deeplabv3plus or deeplabv2) trained on them
                                                          DIR/deeplab (done.json when complete)
  eval     that network scored on seg_config's eval split by the paper's protocol
                                                          DIR/deeplab/eval/step_<N>_paper.json

A preempted or killed pipeline continues where it stopped when the same command is run again:
complete stages are skipped, the stage that was running resumes (training from its latest
checkpoint, export from the PNGs already written). `--stages=deeplab,eval` runs a subset; each
stage needs the outputs of the ones before it. The pseudo labels are of config.export.split,
which must be seg_config.data.train_split.
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
from rsepm_jax import train

STAGES = ("rsepm", "export", "deeplab", "eval")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Single-stage config, e.g. configs/voc.py.", lock_config=True)
_SEG_CONFIG = config_flags.DEFINE_config_file(
    "seg_config", None, "Stage-2 config, e.g. configs/voc_deeplab.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the whole chain.")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Stages to run, from {STAGES}.")
flags.mark_flags_as_required(["config", "seg_config", "workdir"])


def folders(workdir, config):
  """The chain's folders and files under `workdir`."""
  root = epath.Path(workdir)
  return {
      "rsepm": root / "rsepm",
      "pseudo_labels": root / "rsepm" / "pseudo_labels" / config.export.split,
      "export_done": root / "export_done.json",
      "deeplab": root / "deeplab",
  }


def stage_configs(config, seg_config, paths):
  """(single-stage config, stage-2 config) as the chain runs them: the export with the paper's
  protocol, the stage-2 network trained on the exported PNGs and evaluated by the paper's
  protocol."""
  if seg_config.model.arch == "rsepm":
    raise config_check.ConfigError(
        "--seg_config.model.arch='rsepm': the second stage trains deeplabv3plus or deeplabv2 "
        "(e.g. --seg_config=configs/voc_deeplab.py).")
  if seg_config.data.train_split != config.export.split:
    raise config_check.ConfigError(
        f"--seg_config.data.train_split={seg_config.data.train_split!r} but the pseudo labels "
        f"are of --config.export.split={config.export.split!r}; make them equal.")
  config, seg_config = config.copy_and_resolve_references(), seg_config.copy_and_resolve_references()
  with config.unlocked():
    config.export.protocol = "paper"
  with seg_config.unlocked():
    seg_config.data.train_mask_dir = str(paths["pseudo_labels"])
    seg_config.eval.protocol = "paper"
  return config, seg_config


def _completed(path, what):
  if path.exists():
    logging.info("Pipeline: %s is complete (%s); skipped.", what, path)
    return True
  return False


def run(config, seg_config, workdir, stages=STAGES):
  """Runs `stages` of the chain in `workdir`; returns the paper-protocol results of the stage-2
  network when the eval stage ran, {"preempted": stage} when a training was preempted, else {}."""
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise config_check.ConfigError(f"--stages: unknown {unknown}; choose from {STAGES}.")
  paths = folders(workdir, config)
  config, seg_config = stage_configs(config, seg_config, paths)
  config_check.validate(config)
  config_check.validate(seg_config)
  results = {}
  for stage in (s for s in STAGES if s in stages):
    logging.info("Pipeline: stage %s.", stage)
    if stage == "rsepm" and not _completed(paths["rsepm"] / "done.json", "RS+EPM training"):
      if "preempted_at_step" in train.train_and_evaluate(config, str(paths["rsepm"])):
        return {"preempted": stage}
    elif stage == "export" and not _completed(paths["export_done"], "the pseudo-label export"):
      written = export.export_pseudo_labels(config, str(paths["rsepm"]))
      parallel.wait_for_all_processes("pipeline_export_done")  # every host's share is written
      if jax.process_index() == 0:
        count = len(list(paths["pseudo_labels"].glob("*.png")))
        paths["export_done"].write_text(json.dumps(
            {"split": config.export.split, "pngs": count, "written_by_host_0": written}))
    elif stage == "deeplab" and not _completed(paths["deeplab"] / "done.json", "DeepLab training"):
      if "preempted_at_step" in train.train_and_evaluate(seg_config, str(paths["deeplab"])):
        return {"preempted": stage}
    elif stage == "eval":
      done = paths["deeplab"] / "done.json"
      step = json.loads(done.read_text())["step"] if done.exists() else None
      result_file = paths["deeplab"] / "eval" / f"step_{step}_paper.json"
      if step is None or not _completed(result_file, "the paper-protocol evaluation"):
        results = train.evaluate_checkpoint(seg_config, str(paths["deeplab"]))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  checkpoint.quiet_library_logs()
  parallel.maybe_initialize_distributed()
  with cli_errors.one_line_errors():
    run(_CONFIG.value, _SEG_CONFIG.value, _WORKDIR.value, tuple(_STAGES.value))


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=config_check.parse_flags)
