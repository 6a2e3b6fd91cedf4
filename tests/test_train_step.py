"""The shard_map train step: 8 simulated devices give the 1-device result (loss, params, BN)."""
import jax
from jax.sharding import Mesh
import numpy as np

from rsepm_jax.configs import demo
from rsepm_jax import optimizer
from rsepm_jax import parallel
from rsepm_jax import state as state_lib
from rsepm_jax import train_step
from rsepm_jax.data import synthetic
from rsepm_jax.data import transforms


def _batch(config):
  """A global batch of 8 synthetic crops with varied crop boxes (so padding is exercised)."""
  source = synthetic.from_config(config.data, "train")
  rng = np.random.default_rng(0)
  records = []
  for index in range(8):
    record = source[index]
    for transform in transforms.train_transforms(config.data):
      record = transform.random_map(record, rng) if hasattr(transform, "random_map") else transform.map(record)
    records.append(record)
  return {k: np.stack([r[k] for r in records]) for k in ("image", "mask", "labels", "crop_box")}


def _one_step(config, devices):
  mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
  model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
  tx = optimizer.make_optimizer(config.optim, total_steps=10)
  state = state_lib.create_train_state(model, tx, config, state_lib.prng_key(0), mesh)
  step = train_step.make_train_step(model, tx, config, mesh, total_steps=10, steps_per_epoch=5)
  batch = parallel.to_global(_batch(config), mesh)
  rng = jax.device_put(state_lib.prng_key(1), parallel.replicated(mesh))
  new_state, metrics = step(state, batch, rng)
  return jax.device_get(new_state), jax.device_get(metrics)


def test_eight_devices_match_one_device_with_every_loss_active():
  """L_cls, RecurSeed's L_seg/L_cam and the EPM losses on the mixed batch, in one step.

  The 1-device step switches the mixed pass with `lax.cond`, the 8-device one with `where`,
  so the two gatings are checked against each other too.
  """
  config = demo.get_config("smoke")
  config.model.aspp_dropout = 0.0  # dropout masks depend on the device layout
  config.model.decoder_dropout = (0.0, 0.0)
  config.loss.rs_start_epoch = config.loss.decoder_source_epoch = 0
  config.loss.mix_start_epoch = 0
  config.mix.edge_source = "both"
  config.train.mix_gating = "cond"
  one_state, one_metrics = _one_step(config, jax.devices()[:1])
  config.train.mix_gating = "where"
  eight_state, eight_metrics = _one_step(config, jax.devices()[:8])
  assert np.isfinite(one_metrics["loss"])
  assert one_metrics["seed_valid_fraction"] > 0  # RecurSeed produced seeds ...
  assert one_metrics["loss_mix_seg"] > 0  # ... and the mixed batch was trained on
  for name in ("loss", "loss_cls", "loss_seg", "loss_cam", "loss_mix_cls", "loss_mix_seg"):
    np.testing.assert_allclose(eight_metrics[name], one_metrics[name], rtol=1e-5, atol=1e-6)
  for name in ("params", "batch_stats", "ema_params"):
    flat_one = jax.tree.leaves(one_state[name])
    flat_eight = jax.tree.leaves(eight_state[name])
    for a, b in zip(flat_one, flat_eight):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
