r"""RecurSeed + EdgePredictMix: train, evaluate, export pseudo labels or segment images.

  python -m rsepm_jax.main --config=configs/demo.py --workdir=/tmp/rsepm_demo
  python -m rsepm_jax.main --config=configs/demo.py --workdir=/tmp/rsepm_demo --mode=eval
  python -m rsepm_jax.main --config=configs/demo.py --workdir=/tmp/rsepm_demo --mode=export
  python -m rsepm_jax.main --config=configs/demo.py --workdir=/tmp/rsepm_demo --mode=predict \
      --input=photos/ [--output=DIR] [--tags=dog,person]

Modes: train (resumes from the latest checkpoint in --workdir, then evaluates), eval (scores a
checkpoint: the latest or --step; --config.eval.protocol=paper for the paper's multi-scale + flip +
CRF protocol), export (pseudo-label PNGs of config.export.split), predict
(multi-scale + flip segmentation of image files: label PNGs, overlays, CAM heat maps).
eval, export and predict in a workdir without checkpoints use the official RS+EPM weights of
--config.model.init_from=rsepm_r50.pth (or its .safetensors from rsepm_jax.models.convert).

Configs: configs/demo.py (synthetic data), configs/voc.py, configs/coco.py, each with a :smoke
variant; an installed package carries them in its rsepm_jax/configs/ folder
(python -c "import rsepm_jax.configs as c; print(c.__path__[0])"). Every knob is listed, with a
one-line comment, in rsepm_jax/configs/demo.py; override any with --config.KEY=VALUE (e.g.
--config.train.num_epochs=20). The repository's docs/algorithm.md gives the config key of every
method choice.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rsepm_jax import checkpoint
from rsepm_jax import cli_errors
from rsepm_jax import config_check
from rsepm_jax import export
from rsepm_jax import parallel
from rsepm_jax import predict
from rsepm_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py or configs/demo.py:smoke.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export", "predict"],
                          "train: train (resuming if possible) then evaluate; "
                          "eval: evaluate a saved checkpoint without training; "
                          "export: write pseudo-label PNGs of config.export.split; "
                          "predict: segment the images of --input into --output.")
_STEP = flags.DEFINE_integer("step", None,
                             "--mode=eval|export|predict: checkpoint step (default: the latest).")
_INPUT = flags.DEFINE_list("input", None,
                           "--mode=predict: image files, folders or glob patterns, comma-separated.")
_TAGS = flags.DEFINE_list(
    "tags", None, "--mode=predict: class names present in every input image, comma-separated "
    "(default: the classes the network finds).")
_OUTPUT = flags.DEFINE_string("output", None,
                              "--mode=predict: output folder (default: <workdir>/predictions).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Go on when the config differs from the checkpoint's in keys that change the network "
    "(model.*, data.num_classes) or, when resuming training, the schedule (num_epochs, batch, "
    "LR, phase epochs, train split); the differences are logged as warnings.")
flags.mark_flags_as_required(["config", "workdir"])

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  checkpoint.quiet_library_logs()
  parallel.maybe_initialize_distributed()
  logging.info("JAX %s, process %d/%d, local devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_devices())
  config, allow = _CONFIG.value, _ALLOW_CONFIG_CHANGE.value
  with cli_errors.one_line_errors():
    if _MODE.value == "train":
      train.train_and_evaluate(config, _WORKDIR.value, allow)
    elif _MODE.value == "eval":
      train.evaluate_checkpoint(config, _WORKDIR.value, _STEP.value, allow)
    elif _MODE.value == "export":
      export.export_pseudo_labels(config, _WORKDIR.value, _STEP.value, allow_config_change=allow)
    else:
      if not _INPUT.value:
        raise app.UsageError("--mode=predict needs --input (image files, folders or globs).")
      predict.predict(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value, _STEP.value, allow,
                      _TAGS.value)

if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=config_check.parse_flags)
