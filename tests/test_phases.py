"""Phase boundaries of the train step, EMA weights in evaluation, and the CAM-grid stride.

Phases: one compiled step with rs_start_epoch=1, decoder_source_epoch=2, mix_start_epoch=3 and
2 steps per epoch, called at the steps on either side of each boundary (the phase comes from
`state["step"]` inside jit). Dropout is off, so two steps of the same epoch see the same losses.

The decoder's final conv is zeroed: its logits are then exactly 0, which gives known answers:
  * L_seg on any non-empty seed is the cross entropy of uniform logits, log(C + 1);
  * as the RecurSeed source, the decoder is uniform, so after per-class max-normalisation every
    tagged class scores ~1 everywhere and every pixel inside the crop box is a confident seed:
    seed_valid_fraction is the share of the stride-4 grid inside the crop boxes.
"""
import jax
from jax.sharding import Mesh
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax.configs import demo
from rsepm_jax import metric_writer
from rsepm_jax import optimizer
from rsepm_jax import parallel
from rsepm_jax import state as state_lib
from rsepm_jax import train
from rsepm_jax import train_step

STEPS_PER_EPOCH = 2
NUM_CLASSES = 6
# Image 0 is the whole 32 px crop (8x8 mask cells); image 1's box maps to rows 1..4, cols 1..6
# of the mask grid (floor / ceil of 4/4, 6/4, 20/4, 27/4): 4 x 6 = 24 cells.
CROP_BOXES = np.array([[0, 0, 32, 32], [4, 6, 20, 27]], np.int32)
DECODER_SEED_FRACTION = (64 + 24) / 128


def _config():
  config = demo.get_config("smoke")
  config.model.aspp_dropout = 0.0
  config.model.decoder_dropout = (0.0, 0.0)
  config.loss.rs_start_epoch = 1
  config.loss.decoder_source_epoch = 2
  config.loss.mix_start_epoch = 3
  # The known answer below needs a source of ~1 that decides the seeds by itself.
  config.recurseed.normalize_decoder_source = True
  config.recurseed.filter_input = "source"
  return config


def _batch():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(2, 32, 32, 3)).astype(np.uint8)
  image[0, 8:24, 8:24] = (250, 30, 30)  # a square, so the CAM has something to see
  image[1, :, :16] = 20
  labels = np.zeros((2, NUM_CLASSES), np.float32)
  labels[0, [0, 3]] = 1.0
  labels[1, 2] = 1.0
  return {"image": image, "labels": labels, "crop_box": CROP_BOXES}


def _zero_decoder_classifier(params):
  params = jax.tree.map(np.array, params)
  params["decoder"]["classifier"]["kernel"][...] = 0.0
  return params


@pytest.fixture(scope="module")
def setup():
  config = _config()
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
  total_steps = 8
  tx = optimizer.make_optimizer(config.optim, total_steps)
  state = jax.device_get(state_lib.create_train_state(model, tx, config, state_lib.prng_key(0), mesh))
  return config, mesh, model, tx, state, total_steps


def test_losses_switch_on_at_each_phase_boundary(setup):
  config, mesh, model, tx, host_state, total_steps = setup
  host_state = dict(host_state)
  host_state["params"] = _zero_decoder_classifier(host_state["params"])
  step_fn = train_step.make_train_step(model, tx, config, mesh, total_steps, STEPS_PER_EPOCH)
  batch = parallel.to_global(_batch(), mesh)
  rng = jax.device_put(state_lib.prng_key(1), parallel.replicated(mesh))

  def metrics_at(step):
    state = dict(host_state, step=np.asarray(step, np.int32))
    _, metrics = step_fn(jax.device_put(state, parallel.replicated(mesh)), batch, rng)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  m = {step: metrics_at(step) for step in (1, 2, 3, 4, 5, 6)}
  assert step_fn._cache_size() == 1  # one compiled step for every phase
  log_k = np.log(NUM_CLASSES + 1)
  mix_terms = ("loss_mix_cls", "loss_mix_seg", "loss_mix_cam")
  for metrics in m.values():
    assert metrics["non_finite"] == 0 and metrics["loss_cls"] > 0

  # Epoch 0 (step 1): L_cls only, no seeds.
  assert m[1]["loss_seg"] == 0 and m[1]["loss_cam"] == 0 and m[1]["seed_valid_fraction"] == 0
  assert all(m[1][k] == 0 for k in mix_terms)
  # Epoch 1 (steps 2, 3): RecurSeed on CAM seeds; no mixing.
  for step in (2, 3):
    assert m[step]["loss_seg"] == pytest.approx(log_k, rel=1e-5)
    assert m[step]["loss_cam"] > 0
    assert 0 < m[step]["seed_valid_fraction"] < 1
    assert all(m[step][k] == 0 for k in mix_terms)
  # The CAM source is not the decoder's: its seeds leave some of the crop uncertain.
  assert m[3]["seed_valid_fraction"] != pytest.approx(DECODER_SEED_FRACTION)
  # Epoch 2 (steps 4, 5): the decoder is the source: every pixel in the crop is a seed.
  for step in (4, 5):
    assert m[step]["seed_valid_fraction"] == pytest.approx(DECODER_SEED_FRACTION, abs=1e-6)
    assert m[step]["loss_seg"] == pytest.approx(log_k, rel=1e-5)
    assert all(m[step][k] == 0 for k in mix_terms)
  assert m[4]["loss_cam"] != pytest.approx(m[3]["loss_cam"])
  # Same state and batch on each side of the source switch: only the seeds changed.
  assert m[4]["loss_cls"] == pytest.approx(m[3]["loss_cls"], rel=1e-6)
  # Epoch 3 (step 6): the mixed batch is trained on.
  assert all(m[6][k] > 0 for k in mix_terms)
  assert m[6]["loss_mix_seg"] == pytest.approx(log_k, rel=1e-5)
  # Within an epoch nothing depends on the step (dropout is off).
  for a, b in ((2, 3), (4, 5)):
    for name in ("loss_cls", "loss_seg", "loss_cam", "seed_valid_fraction"):
      assert m[a][name] == pytest.approx(m[b][name], rel=1e-6), (a, b, name)
  # The poly LR is read at the step counter, from 0.
  for step, metrics in m.items():
    assert metrics["lr"] == pytest.approx(config.optim.lr * (1 - step / total_steps) ** 0.9, rel=1e-5)


def test_evaluation_follows_config_eval_use_ema(setup, tmp_path):
  config, mesh, model, _, host_state, _ = setup
  state = dict(host_state)
  ema = jax.tree.map(np.array, state["ema_params"])
  ema["classifier"]["kernel"][...] = 0.0  # the EMA's CAM is 0 everywhere: all background
  state["ema_params"] = ema
  state = jax.device_put(state, parallel.replicated(mesh))

  ema_variables = state_lib.eval_variables(state, use_ema=True)
  raw_variables = state_lib.eval_variables(state, use_ema=False)
  assert ema_variables["params"] is state["ema_params"]
  assert ema_variables["batch_stats"] is state["ema_batch_stats"]
  assert raw_variables["params"] is state["params"] and raw_variables["batch_stats"] is state["batch_stats"]

  writer = metric_writer.MetricWriter(str(tmp_path))
  results = {}
  for use_ema in (True, False):
    config.eval.use_ema = use_ema
    results[use_ema] = train._evaluate_and_report(
        model, state, config, mesh, str(tmp_path / str(use_ema)), 0, writer)
  config.eval.use_ema = True
  with_ema, without_ema = results[True], results[False]
  # Zero CAM: every threshold predicts background, which is the all-background score.
  assert with_ema["cam"]["miou"] == pytest.approx(with_ema["all_background_miou"], abs=1e-9)
  assert without_ema["cam"]["miou"] != pytest.approx(without_ema["all_background_miou"], abs=1e-6)
  # The decoder weights are the same in both copies, and so are its scores.
  assert with_ema["decoder"]["miou"] == pytest.approx(without_ema["decoder"]["miou"])


def test_cam_grid_and_crop_box_stride_with_last_stride_2():
  config = demo.get_config("smoke")
  config.model.output_stride = 8
  config.model.last_stride = 2
  assert train_step.cam_stride(config) == 16
  model = state_lib.build_model(config)
  images = jnp.zeros((2, 64, 64, 3))
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), images)[0])
  assert shapes["cams"].shape == (2, 4, 4, NUM_CLASSES)  # 64 / 16

  rng = np.random.default_rng(0)
  cams = rng.normal(size=(2, 4, 4, NUM_CLASSES)).astype(np.float32)
  labels = (rng.uniform(size=(2, NUM_CLASSES)) > 0.5).astype(np.float32)
  # Image 0: the top-left 32x32 -> CAM cells [:2, :2]. Image 1: 20x36 px -> [:2, :3] (ceil).
  crop_box = np.array([[0, 0, 32, 32], [0, 0, 20, 36]], np.int32)
  loss = train_step.cls_loss({"cams": jnp.asarray(cams)}, jnp.asarray(labels),
                             jnp.asarray(crop_box), train_step.cam_stride(config))
  pooled = np.stack([cams[0, :2, :2].mean(axis=(0, 1)), cams[1, :2, :3].mean(axis=(0, 1))])
  # MultiLabelSoftMarginLoss: -mean(y log sigmoid(x) + (1 - y) log sigmoid(-x)).
  sigmoid = 1 / (1 + np.exp(-pooled.astype(np.float64)))
  expected = -np.mean(labels * np.log(sigmoid) + (1 - labels) * np.log(1 - sigmoid))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
