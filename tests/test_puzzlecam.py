"""Puzzle-CAM (components spec A.2-A.4): tiling, merging, the losses and the jitted step."""
import json

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from rsepm_jax import config_check
from rsepm_jax import optimizer
from rsepm_jax import parallel
from rsepm_jax import puzzle_train_step
from rsepm_jax import state as state_lib
from rsepm_jax import train
from rsepm_jax.configs import demo
from rsepm_jax.configs import puzzlecam_voc


def test_tile_is_row_major_quarters_on_the_batch_axis_and_merge_inverts_it():
  images = np.random.default_rng(0).normal(size=(3, 6, 10, 2)).astype(np.float32)
  tiles = np.asarray(puzzle_train_step.tile(images))
  assert tiles.shape == (12, 3, 5, 2)
  for b in range(3):
    for t, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # TL, TR, BL, BR
      np.testing.assert_array_equal(tiles[t * 3 + b], images[b, 3 * r:3 * r + 3, 5 * c:5 * c + 5])
  np.testing.assert_array_equal(np.asarray(puzzle_train_step.merge(tiles, 3)), images)
  np.testing.assert_array_equal(np.asarray(puzzle_train_step.tile(puzzle_train_step.merge(
      tiles, 3))), tiles)
  with pytest.raises(ValueError, match="4 x 2 tiles"):
    puzzle_train_step.merge(tiles, 2)


def test_reconstruction_loss_by_hand():
  # Two images, a 1 x 2 map, two classes; image 0 is tagged class 0, image 1 both classes.
  cams = np.array([[[[1.0, 5.0], [-2.0, 0.0]]], [[[0.5, 1.0], [3.0, -1.0]]]], np.float32)
  merged = np.array([[[[0.0, 9.0], [1.0, 7.0]]], [[[0.5, 3.0], [1.0, 1.0]]]], np.float32)
  labels = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
  # |diff| on the tagged classes: image 0 class 0: 1 + 3; image 1: 0 + 2 + 2 + 2. 8 cells.
  expected = (1 + 3 + 0 + 2 + 2 + 2) / 8
  loss = puzzle_train_step.reconstruction_loss(cams, merged, labels)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # "cam" level: relu, then each class / its max (+1e-5): image 0 class 0 maps [1, 0] vs [0, 1].
  loss = puzzle_train_step.reconstruction_loss(cams[:1], merged[:1], labels[:1], level="cam")
  np.testing.assert_allclose(loss, (1 / (1 + 1e-5) + 1 / (1 + 1e-5)) / 4, rtol=1e-5)


def test_alpha_rises_linearly_to_its_maximum_at_the_ramp_fraction():
  settings = puzzle_train_step.PuzzleSettings(alpha_max=4.0, alpha_ramp=0.5)
  values = [float(puzzle_train_step.alpha(step, 100, settings)) for step in (0, 25, 49, 50, 99)]
  np.testing.assert_allclose(values, [0.0, 2.0, 4 * 49 / 50, 4.0, 4.0], rtol=1e-6)


def _mlsm(logits, labels):
  """MultiLabelSoftMarginLoss in float64 NumPy."""
  logits = logits.astype(np.float64)
  log_sig, log_not = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)
  return np.mean(-(labels * log_sig + (1 - labels) * log_not))


def _config():
  config = demo.get_config("smoke")
  config.method = "puzzlecam"
  config.model.with_decoder = False
  return config


def test_step_loss_on_four_devices_equals_the_three_terms_computed_independently():
  """The step's loss at step 3 of 10 (alpha = 4 * 3 / 5), its batch split over 4 devices, against
  the network applied on one device to the crops and to the quarters cut by NumPy slicing, merged
  by NumPy, with NumPy's MLSM and L1 (BatchNorm statistics synchronised: the same values)."""
  config = _config()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
  labels = (rng.random((8, config.data.num_classes)) < 0.4).astype(np.float32)
  labels[:, 0] = 1.0
  batch = {"image": images, "labels": labels,
           "crop_box": np.tile(np.array([0, 0, 16, 16], np.int32), (8, 1)),
           "mask": np.zeros((8, 16, 16), np.uint8)}
  model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
  tx = optimizer.make_optimizer(config.optim, total_steps=10)
  mesh = Mesh(np.asarray(jax.devices()[:4]), (parallel.DATA_AXIS,))
  state = state_lib.create_train_state(model, tx, config, state_lib.prng_key(0), mesh)
  variables = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
  state["step"] = jax.device_put(jnp.asarray(3, state["step"].dtype), parallel.replicated(mesh))
  step = puzzle_train_step.make_train_step(model, tx, config, mesh, 10, 5)
  rng_key = jax.device_put(state_lib.prng_key(1), parallel.replicated(mesh))
  new_state, metrics = jax.device_get(step(state, parallel.to_global(batch, mesh), rng_key))

  plain = state_lib.build_model(config)  # no mesh axis: one device sees the whole batch
  cams_of = jax.jit(lambda x: plain.apply(variables, x, train=True, mutable=["batch_stats"])[0][
      "cams"])
  normalized = np.asarray((images / 255.0 - np.array([0.485, 0.456, 0.406]))
                          / np.array([0.229, 0.224, 0.225]), np.float32)
  cams = np.asarray(cams_of(normalized), np.float64)
  quarters = np.concatenate([normalized[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
                             for r in (0, 1) for c in (0, 1)])
  quarter_cams = np.asarray(cams_of(quarters), np.float64)
  half = quarter_cams.shape[1]
  merged = np.zeros_like(cams)
  for t, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    merged[:, half * r:half * (r + 1), half * c:half * (c + 1)] = quarter_cams[8 * t:8 * t + 8]
  cls = _mlsm(cams.mean(axis=(1, 2)), labels)
  pcls = _mlsm(merged.mean(axis=(1, 2)), labels)
  re = np.mean(np.abs(cams - merged) * labels[:, None, None, :])
  alpha = 4.0 * 3 / 5
  np.testing.assert_allclose(metrics["loss_cls"], cls, rtol=2e-4)
  np.testing.assert_allclose(metrics["loss_pcls"], pcls, rtol=2e-4)
  np.testing.assert_allclose(metrics["loss_re"], re, rtol=2e-4)
  np.testing.assert_allclose(metrics["alpha"], alpha, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], cls + pcls + alpha * re, rtol=2e-4)
  assert re > 0 and metrics["non_finite"] == 0
  assert int(new_state["step"]) == 4


def test_train_picks_the_puzzle_step_and_configs_check_the_crop():
  assert train.step_module(_config()) is puzzle_train_step
  config = _config()
  config.train.num_epochs = 1  # RS+EPM's phase epochs do not apply to Puzzle-CAM
  config_check.validate(config)
  config.model.with_decoder, config.data.crop_size = True, 40
  with pytest.raises(config_check.ConfigError) as error:
    config_check.validate(config)
  assert "config.model.with_decoder=True: expected False for method='puzzlecam'" in str(error.value)
  assert "config.data.crop_size=40: expected for method='puzzlecam' a multiple of twice" in str(
      error.value)
  config = puzzlecam_voc.get_config("smoke")
  assert (config.method, config.model.with_decoder) == ("puzzlecam", False)
  assert puzzlecam_voc.get_config().model.backbone == "resnest101"
  with pytest.raises(ValueError, match="unknown variant"):
    puzzlecam_voc.get_config("resnest102")


def test_training_run_logs_the_alpha_ramp(tmp_path):
  """`train_and_evaluate` with method=puzzlecam: the step, its metrics and the CAM evaluation."""
  config = _config()
  config.data.synthetic.num_train, config.data.synthetic.num_eval = 16, 8
  config.train.log_every = 1
  config.train.num_summary_images = 0
  results = train.train_and_evaluate(config, str(tmp_path))
  assert 0 <= results["cam"]["miou"] <= 1 and "decoder" not in results
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  alphas = {row["step"]: row["alpha"] for row in logged if "alpha" in row}
  # 2 epochs of 16 images at batch 8: alpha = 4 t / (4 * 0.5) at t = step - 1, at most 4.
  assert alphas == pytest.approx({1: 0.0, 2: 2.0, 3: 4.0, 4: 4.0})
