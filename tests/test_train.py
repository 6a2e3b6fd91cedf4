"""End-to-end: train_and_evaluate trains, checkpoints, evaluates and fails clearly (resume after a
real kill: test_processes.py)."""
import json
import re

import jax
import numpy as np
import pytest

from rsepm_jax.configs import demo
from rsepm_jax import checkpoint
from rsepm_jax import metric_writer
from rsepm_jax import optimizer
from rsepm_jax import parallel
from rsepm_jax import state as state_lib
from rsepm_jax import train


def smoke_config(**train_overrides):
  config = demo.get_config("smoke")
  config.train.update(train_overrides)
  return config


def _restore_latest(config, workdir):
  mesh = parallel.make_mesh()
  model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
  _, total_steps = train.schedule_lengths(config)
  tx = optimizer.make_optimizer(config.optim, total_steps)
  target = state_lib.create_train_state(model, tx, config, state_lib.prng_key(1), mesh)
  manager = checkpoint.make_manager(workdir)
  step = manager.latest_step()
  state = checkpoint.restore(manager, step, target)
  manager.close()
  return step, jax.device_get(state)


def test_train_reduces_loss_checkpoints_and_evaluates(tmp_path):
  config = smoke_config(num_epochs=6, log_every=1)
  results = train.train_and_evaluate(config, str(tmp_path))
  records = [r for r in metric_writer.read_metrics(tmp_path) if "loss" in r]
  assert [r["step"] for r in records] == list(range(1, 25))
  assert all("images_per_s" in r and "lr" in r and "grad_norm" in r for r in records)
  # L_cls is trained throughout; RecurSeed and mixing switch on at epoch 1 (step 5) in smoke.
  cls = [r["loss_cls"] for r in records]
  assert np.mean(cls[-4:]) < 0.8 * np.mean(cls[:4])
  assert all(r["loss_seg"] == 0 and r["loss_mix_cls"] == 0 for r in records[:4])
  assert all(r["loss_seg"] > 0 and r["loss_mix_cls"] > 0 for r in records[4:])
  saved = json.loads((tmp_path / "eval" / "step_24.json").read_text())
  assert saved["num_images"] == config.data.synthetic.num_eval
  assert 0.0 <= results["cam"]["miou"] <= 1.0
  assert saved["cam"]["miou"] == pytest.approx(results["cam"]["miou"])
  assert len(saved["cam"]["iou"]) == config.data.num_classes + 1
  step, _ = _restore_latest(config, tmp_path)
  assert step == 24
  # --mode=eval on the saved checkpoint reproduces the end-of-training scores ...
  again = train.evaluate_checkpoint(config, str(tmp_path), step=24)
  assert again["cam"]["miou"] == pytest.approx(results["cam"]["miou"])
  assert again["decoder"]["miou"] == pytest.approx(results["decoder"]["miou"])
  assert 0 < again["all_background_miou"] < 1
  # ... and a step that was not kept is a clear error listing the ones that were.
  with pytest.raises(FileNotFoundError, match=r"step 8 not found.*\[20, 24\]"):
    train.evaluate_checkpoint(config, str(tmp_path), step=8)


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
  config = smoke_config(num_epochs=1, checkpoint_every=4)
  train.train_and_evaluate(config, str(tmp_path))
  _, before = _restore_latest(config, tmp_path)
  exploding = smoke_config(num_epochs=2, checkpoint_every=4)
  exploding.optim.lr = 1e30
  with pytest.raises(FloatingPointError, match=r"at step \d+") as error:
    train.train_and_evaluate(exploding, str(tmp_path), allow_config_change=True)
  failed_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  assert 5 <= failed_step <= 8
  step, after = _restore_latest(config, tmp_path)
  assert step == 4
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_global_batch_that_does_not_divide_over_devices_is_an_error(tmp_path):
  config = smoke_config(global_batch_size=12)
  with pytest.raises(ValueError, match="global_batch_size=12 does not divide over 8 devices"):
    train.train_and_evaluate(config, str(tmp_path))


def test_workdir_that_cannot_be_created_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("keep me")
  with pytest.raises(OSError, match="workdir"):
    train.train_and_evaluate(smoke_config(), str(blocker / "run"))
  assert blocker.read_text() == "keep me"


def test_max_steps_per_epoch_caps_the_epoch_not_the_number_of_epochs():
  config = smoke_config()  # 32 synthetic train images at a global batch of 8: 4 steps an epoch
  assert train.schedule_lengths(config) == (4, 4 * config.train.num_epochs)
  config.train.max_steps_per_epoch = 3
  assert train.schedule_lengths(config) == (3, 3 * config.train.num_epochs)
  config.train.max_steps_per_epoch = 10
  assert train.schedule_lengths(config) == (4, 4 * config.train.num_epochs)
