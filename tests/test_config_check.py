"""Config safety: validation up front, the config saved with each checkpoint, refused changes on
resume and evaluation, and the one-line "did you mean" of a mistyped override."""
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import pytest

from rsepm_jax import checkpoint
from rsepm_jax import config_check
from rsepm_jax import optimizer
from rsepm_jax import parallel
from rsepm_jax import state as state_lib
from rsepm_jax import train
from rsepm_jax.configs import coco
from rsepm_jax.configs import coco_deeplab
from rsepm_jax.configs import demo
from rsepm_jax.configs import voc
from rsepm_jax.configs import voc_deeplab
from rsepm_jax.configs import voc_rw
from rsepm_jax.data import pipeline
from rsepm_jax.data import synthetic


def smoke_config(**train_overrides):
  """test_train's run (6 epochs of 4 steps: one compiled step for all), checkpoints at 20 and 24."""
  config = demo.get_config("smoke")
  config.train.update({"num_epochs": 6, "log_every": 1, "checkpoint_every": 20,
                       "tensorboard": False, **train_overrides})
  return config


def _problems(config):
  with pytest.raises(config_check.ConfigError) as error:
    config_check.validate(config)
  return str(error.value)


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("module,variants", [(demo, ("", "smoke", "ablation")),
                                             (voc, ("", "r101", "smoke")),
                                             (coco, ("", "r101", "smoke")),
                                             (voc_deeplab, ("", "smoke")),
                                             (voc_rw, ("", "smoke")),
                                             (coco_deeplab, ("", "smoke"))])
def test_every_shipped_config_is_valid(module, variants):
  for variant in variants:
    config = module.get_config(variant)
    if config.data.name != "synthetic":
      config.data.root = "/data"  # the one value a user must supply
    config_check.validate(config)


def test_wrong_types_are_named_together_with_the_expected_form():
  values = demo.get_config().to_dict()  # as a user's own config file could hold them
  values["data"]["resize_range"] = ("abc",)  # what --config.data.resize_range=abc gives
  values["model"]["aspp_dilations"] = (2, 4.5)
  values["data"]["color_jitter"] = (0.3, 0.3, 0.3)
  values["data"]["hflip"] = "yes"
  values["train"]["num_epochs"] = 2.5
  message = _problems(ml_collections.ConfigDict(values))
  assert "(5 problems)" in message
  assert "config.data.resize_range=('abc',): expected a tuple of 2 ints, like (80, 112)" in message
  assert "config.model.aspp_dilations=(2, 4.5): expected a tuple of 0 or more ints" in message
  assert "config.data.color_jitter=(0.3, 0.3, 0.3): expected a tuple of 4 floats" in message
  assert "config.data.hflip='yes': expected a bool, like True" in message
  assert "config.train.num_epochs=2.5: expected an int, like 12" in message


def test_values_out_of_range_are_named_together():
  config = demo.get_config()
  config.optim.lr = 0.0
  config.model.output_stride = 32
  config.model.backbone = "resnet34"
  config.data.name = "imagenet"
  config.recurseed.certain = 1.5
  config.train.num_epochs = 6
  config.loss.mix_start_epoch = 8  # past the end: mixing would never start
  config.data.crop_size = 100  # not a multiple of the CAM stride (32 with the stride above)
  config.eval.global_batch_size = 0
  config.mix.kind = "epmm"
  config.inference.background = "gamma"
  message = _problems(config)
  for expected in ("config.optim.lr=0.0: expected > 0",
                   "config.model.output_stride=32: expected 8 or 16",
                   "config.model.backbone='resnet34': expected one of ('resnet50', 'resnet101', 'resnest50', "
                   "'resnest101', 'resnest200', 'resnest269', 'tiny')",
                   "config.data.name='imagenet': expected one of",
                   "config.recurseed.certain=1.5: expected in [0, 1]",
                   "config.loss.mix_start_epoch=8: expected in [0, train.num_epochs=6]",
                   "config.data.crop_size=100: expected a multiple of the CAM stride 32",
                   "config.eval.global_batch_size=0: expected >= 1",
                   "config.mix: MixSettings.kind='epmm'",
                   "config.inference.background='gamma': expected one of ('power', 'constant')"):
    assert expected in message
  # A VOC config needs its data folder, except to segment the user's own images (predict).
  config = voc.get_config()
  assert "config.data.root='': expected the dataset folder" in _problems(config)
  config_check.validate(config, reads_data=False)
  # The modules' own constructors report too: here the synthetic generator's shape count.
  config = demo.get_config()
  config.data.num_classes = len(synthetic.CLASS_NAMES) + 1
  assert "config.data.synthetic: SyntheticWSSS: num_classes must be in 1.." in _problems(config)


def test_training_masks_are_for_the_deeplab_networks_and_change_the_schedule():
  config = demo.get_config()
  config.data.train_mask_dir = "/pseudo_labels/train"
  assert ("config.data.train_mask_dir='/pseudo_labels/train': expected empty for "
          "model.arch='rsepm'" in _problems(config))
  config.model.arch = "deeplabv3plus"
  config.data.crop_size = 100  # the DeepLab logits are upsampled to any crop
  config_check.validate(config)
  assert config_check.kind_of("data.train_mask_dir") == config_check.SCHEDULE


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv2"])
def test_the_deeplab_networks_train_and_evaluate_and_export_with_the_paper_protocol(arch):
  config = demo.get_config()
  config.model.arch = arch
  config_check.check_mode(config, "train")
  config_check.check_mode(config, "eval")  # single scale: the decoder head alone
  with pytest.raises(config_check.ConfigError, match=rf"^--mode=export of config.model.arch="
                     rf"'{arch}' needs --config.export.protocol=paper: "):
    config_check.check_mode(config, "export")
  config.export.protocol = "paper"
  config_check.check_mode(config, "export")


def test_a_key_unknown_to_demo_py_gets_the_closest_known_key():
  config = demo.get_config()
  config.data.resize_rnge = (80, 112)
  assert ("Unknown config key 'data.resize_rnge'; did you mean 'data.resize_range'?"
          in _problems(config))


def _main(*args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "rsepm_jax.main", "--config=configs/demo.py:smoke",
                         *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_command_line_typo_is_one_line_and_bad_value_stops_before_the_workdir(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "run"
  typo = _main(f"--workdir={workdir}", "--config.trian.num_epochs=3", cwd=root)
  assert typo.returncode == 1
  assert typo.stderr.strip().splitlines() == [
      "Unknown config key 'trian.num_epochs'; did you mean 'train.num_epochs'?"]
  bad = _main(f"--workdir={workdir}", "--config.data.resize_range=abc", cwd=root)
  assert bad.returncode == 1
  assert "config.data.resize_range=('abc',): expected a tuple of 2 ints" in bad.stderr
  assert "Traceback" not in bad.stderr
  assert not workdir.exists()


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained by `smoke_config()`."""
  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(smoke_config(), str(workdir))
  return workdir


def test_each_checkpoint_and_config_json_hold_the_run_config(trained):
  manager = checkpoint.make_manager(trained)
  saved = checkpoint.saved_config(manager, 24)
  manager.close()
  expected = json.loads(smoke_config().to_json())
  assert saved == {"config": expected, config_check.STEPS_PER_EPOCH: 4}
  assert json.loads((trained / "config.json").read_text()) == expected


def test_resume_refuses_schedule_and_network_changes_naming_the_keys(trained):
  config_json = (trained / "config.json").read_text()
  with pytest.raises(config_check.ConfigError, match="--allow_config_change") as error:
    train.train_and_evaluate(smoke_config(num_epochs=7), str(trained))
  assert "train.num_epochs: 6 -> 7" in str(error.value)
  longer = smoke_config(global_batch_size=16)
  longer.model.backbone = "resnet50"
  longer.data.num_workers = 1  # safe: not listed
  with pytest.raises(config_check.ConfigError) as error:
    train.train_and_evaluate(longer, str(trained))
  changes = str(error.value).split("\n")[1:-1]
  assert changes == ["  model.backbone: 'tiny' -> 'resnet50'",
                     "  train.global_batch_size: 8 -> 16",
                     "  steps per epoch: 4 -> 2"]
  assert (trained / "config.json").read_text() == config_json  # refused before it is written


def test_resume_with_allow_config_change_trains_on_with_the_new_config(trained, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / "24")  # resume at step 20
  # A new seed changes the data order: refused without the flag; the step program is the same.
  config = smoke_config(log_every=2)
  config.seed = 1
  with pytest.raises(config_check.ConfigError, match="  seed: 0 -> 1\n"):
    train.train_and_evaluate(config, str(workdir))
  with caplog.at_level("INFO", logger="absl"):
    train.train_and_evaluate(config, str(workdir), allow_config_change=True)
  assert "allowed by --allow_config_change:\n  seed: 0 -> 1" in caplog.text
  assert "allowed:\n  train.log_every: 1 -> 2" in caplog.text
  assert "Training steps 20..24" in caplog.text
  assert json.loads((workdir / "done.json").read_text())["step"] == 24
  manager = checkpoint.make_manager(workdir)
  assert checkpoint.saved_config(manager, 24)["config"]["seed"] == 1
  # A longer schedule goes through the same check (training it would compile another step).
  config.train.num_epochs = 7
  assert checkpoint.check_config(manager, 24, config, True, True, 4) == [
      ("train.num_epochs", config_check.SCHEDULE, 6, 7)]
  manager.close()
  assert json.loads((workdir / "config.json").read_text())["seed"] == 1


def test_eval_refuses_a_network_change_and_names_it_when_shapes_differ(trained):
  wider = smoke_config()
  wider.model.decoder_channels = 16
  with pytest.raises(config_check.ConfigError,
                     match=r"keys that change the network:\n  model.decoder_channels: 8 -> 16\n"):
    train.evaluate_checkpoint(wider, str(trained))
  # Allowed, the shapes still cannot load: the error names the key instead of orbax's shapes.
  with pytest.raises(config_check.ConfigError,
                     match=r"do not fit the model of this config; these config keys differ from "
                           r"the saved ones:\n  model.decoder_channels: 8 -> 16\n\(orbax: "):
    train.evaluate_checkpoint(wider, str(trained), allow_config_change=True)
  # Evaluation ignores the schedule.
  manager = checkpoint.make_manager(trained)
  assert checkpoint.check_config(manager, 24, smoke_config(num_epochs=5), False, False) == []
  manager.close()


def test_checkpoint_saved_without_config_restores_and_a_misfit_is_a_clear_error(tmp_path, caplog):
  config = smoke_config()
  mesh = parallel.make_mesh()
  tx = optimizer.make_optimizer(config.optim, total_steps=2)

  def state_of(config):
    model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
    return state_lib.create_train_state(model, tx, config, state_lib.prng_key(0), mesh)

  manager = checkpoint.make_manager(tmp_path)
  checkpoint.save(manager, 1, state_of(config), pipeline.train_iterator(config.data, 8, seed=0))
  manager.wait_until_finished()
  with caplog.at_level("WARNING", logger="absl"):
    assert checkpoint.check_config(manager, 1, config, True, False) == []
  assert "was saved without its config" in caplog.text
  assert int(checkpoint.restore(manager, 1, state_of(config))["step"]) == 0
  no_decoder = smoke_config()
  no_decoder.model.with_decoder = False
  with pytest.raises(config_check.ConfigError,
                     match="do not fit the model of this config; check model.* and data.num_classes"):
    checkpoint.restore(manager, 1, state_of(no_decoder))
  manager.close()
