"""SGD groups, poly LR and EMA (spec 7.1) against PyTorch's formulas written in numpy."""
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rsepm_jax.configs import demo
from rsepm_jax import optimizer
from rsepm_jax import state as state_lib


def test_groups_of_a_real_rsepmnet_params_tree():
  config = demo.get_config("smoke")
  model = state_lib.build_model(config)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
  groups = flax.traverse_util.flatten_dict(optimizer.parameter_groups(shapes))
  expected = {
      ("backbone", "conv1", "kernel"): "backbone_weight",  # stem conv
      ("backbone", "layer3_0", "conv2", "kernel"): "backbone_weight",
      ("backbone", "bn1", "scale"): "backbone_weight",  # BN scale: a weight
      ("backbone", "bn1", "bias"): "backbone_bias",  # BN offset: a bias
      ("backbone", "layer4_0", "downsample_bn", "bias"): "backbone_bias",
      ("classifier", "kernel"): "new_weight",
      ("decoder", "conv1", "conv", "kernel"): "new_weight",
      ("decoder", "classifier", "kernel"): "new_weight",
      ("decoder", "low_level", "bn", "scale"): "new_weight",
      ("aspp", "project", "bn", "bias"): "new_bias",
      ("aspp", "branch_3x3_0", "bn", "bias"): "new_bias",
  }
  for path, group in expected.items():
    assert groups[path] == group, path
  assert set(groups.values()) == set(optimizer.GROUPS)
  assert set(groups) == set(flax.traverse_util.flatten_dict(shapes))
  # Every BN offset, and nothing else, is a bias: the convs have no bias parameter.
  for path, group in groups.items():
    assert group.endswith("bias") == (path[-1] == "bias"), path
    assert group.startswith("backbone") == (path[0] == "backbone"), path


def _optim_config(nesterov):
  return ml_collections.ConfigDict(dict(
      lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01, poly_power=0.9,
      lr_backbone_weight=1.0, lr_backbone_bias=2.0, lr_new_weight=10.0, lr_new_bias=20.0))


TINY_PARAMS = {
    "backbone": {"conv": {"kernel": np.array([1.0, -2.0], np.float32)},
                 "bn": {"scale": np.array([0.5], np.float32), "bias": np.array([0.3], np.float32)}},
    "classifier": {"kernel": np.array([[2.0, -1.0]], np.float32)},
    "aspp": {"bn": {"scale": np.array([1.5], np.float32), "bias": np.array([-0.4], np.float32)}},
}
# (multiplier, decayed) per leaf, by hand from the group rules.
TINY_GROUPS = {
    ("backbone", "conv", "kernel"): (1.0, True),
    ("backbone", "bn", "scale"): (1.0, True),
    ("backbone", "bn", "bias"): (2.0, False),
    ("classifier", "kernel"): (10.0, True),
    ("aspp", "bn", "scale"): (10.0, True),
    ("aspp", "bn", "bias"): (20.0, False),
}


@pytest.mark.parametrize("nesterov", [True, False])
def test_three_sgd_steps_match_pytorch_sgd_per_group(nesterov):
  config = _optim_config(nesterov)
  total_steps = 10
  tx = optimizer.make_optimizer(config, total_steps)
  params = jax.tree.map(jnp.asarray, TINY_PARAMS)
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  grads_per_step = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), TINY_PARAMS)
                    for _ in range(3)]

  flat_params = {k: v.astype(np.float64) for k, v in flax.traverse_util.flatten_dict(TINY_PARAMS).items()}
  buffers = {}
  for t, grads in enumerate(grads_per_step):
    updates, opt_state = tx.update(jax.tree.map(jnp.asarray, grads), opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    # PyTorch SGD (dampening 0) with the group's lr = lr0 * mult * (1 - t / T)^0.9.
    lr_t = config.lr * (1 - t / total_steps) ** 0.9
    for path, g in flax.traverse_util.flatten_dict(grads).items():
      multiplier, decayed = TINY_GROUPS[path]
      d_p = g.astype(np.float64) + (config.weight_decay * flat_params[path] if decayed else 0.0)
      buffers[path] = d_p if t == 0 else config.momentum * buffers[path] + d_p
      if nesterov:
        d_p = d_p + config.momentum * buffers[path]
      else:
        d_p = buffers[path]
      flat_params[path] = flat_params[path] - lr_t * multiplier * d_p
    got = flax.traverse_util.flatten_dict(jax.device_get(params))
    for path, value in flat_params.items():
      np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-6, err_msg=f"step {t} {path}")


def test_poly_schedule_values():
  schedule = optimizer.poly_schedule(0.01, 100, 0.9)
  for t in (0, 1, 50, 99):
    np.testing.assert_allclose(schedule(t), 0.01 * (1 - t / 100) ** 0.9, rtol=1e-6)
  assert float(schedule(0)) == pytest.approx(0.01)
  assert float(schedule(100)) == 0.0
  assert float(schedule(150)) == 0.0


def test_ema_decay_ramp():
  decay, ramp = 0.999, 2000
  for n, expected in ((1, decay * (1 - np.exp(-1 / ramp))),
                      (ramp, decay * (1 - np.exp(-1.0))),
                      (10 * ramp, decay * (1 - np.exp(-10.0)))):
    np.testing.assert_allclose(optimizer.ema_decay(jnp.asarray(n, jnp.int32), decay, ramp),
                               expected, rtol=1e-5, atol=1e-7)  # float32 1 - exp(-5e-4)
  # The first update keeps almost nothing of the old EMA: 0.999 * (1 - e^-1/2000) ~ 5e-4.
  assert float(optimizer.ema_decay(jnp.asarray(1), decay, ramp)) < 1e-3


def test_ema_update_arithmetic():
  ema = {"a": jnp.asarray([4.0, 0.0]), "b": {"c": jnp.asarray(-2.0)}}
  new = {"a": jnp.asarray([8.0, 1.0]), "b": {"c": jnp.asarray(2.0)}}
  out = jax.device_get(optimizer.ema_update(ema, new, 0.75))
  np.testing.assert_allclose(out["a"], [5.0, 0.25])  # 0.75 * 4 + 0.25 * 8, 0.25 * 1
  np.testing.assert_allclose(out["b"]["c"], -1.0)  # 0.75 * -2 + 0.25 * 2
  out = jax.device_get(optimizer.ema_update(ema, new, 0.0))
  np.testing.assert_allclose(out["a"], [8.0, 1.0])
