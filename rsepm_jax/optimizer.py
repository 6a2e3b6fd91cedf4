"""SGD with per-group learning rates, poly decay and the EMA of spec 7.1.

Parameters fall into four groups (the official `get_parameter_groups`): backbone weights,
backbone biases, new-layer weights, new-layer biases. "Backbone" is the `backbone` submodule of
every network (`RSEPMNet`, `DeepLabV3Plus`, `DeepLabV2`), the rest (classifier, ASPP, decoder)
is new; "weights" are conv kernels and BN scales, "biases" are biases and BN offsets.
Weight decay applies to the weight groups only, added to the gradient before momentum as
PyTorch's SGD does.
"""
import flax
import jax
import jax.numpy as jnp
import optax

GROUPS = ("backbone_weight", "backbone_bias", "new_weight", "new_bias")


def parameter_groups(params):
  """Pytree of group names with the structure of `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  labels = {}
  for path in flat:
    part = "backbone" if path[0] == "backbone" else "new"
    kind = "bias" if path[-1] == "bias" else "weight"
    labels[path] = f"{part}_{kind}"
  return flax.traverse_util.unflatten_dict(labels)


def poly_schedule(base_lr, total_steps, power):
  """lr_t = base_lr * (1 - t / T)^power, t counted from 0 (spec 7.1 PolyLR)."""
  return optax.polynomial_schedule(
      init_value=base_lr, end_value=0.0, power=power, transition_steps=max(total_steps, 1))


def make_optimizer(optim_config, total_steps):
  """optax transformation implementing spec 7.1 for the params of any `networks` network."""
  schedule = poly_schedule(optim_config.lr, total_steps, optim_config.poly_power)
  multipliers = {
      "backbone_weight": optim_config.lr_backbone_weight,
      "backbone_bias": optim_config.lr_backbone_bias,
      "new_weight": optim_config.lr_new_weight,
      "new_bias": optim_config.lr_new_bias,
  }

  def group_lr(multiplier):
    return optax.scale_by_schedule(lambda step: -multiplier * schedule(step))

  weight_decay_mask = lambda params: jax.tree.map(
      lambda group: group.endswith("weight"), parameter_groups(params))
  return optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay, mask=weight_decay_mask),
      optax.trace(decay=optim_config.momentum, nesterov=optim_config.nesterov),
      optax.multi_transform({g: group_lr(m) for g, m in multipliers.items()}, parameter_groups),
  )


def ema_decay(step, decay, ramp_steps):
  """Decay used at update number `step` (1-based): decay * (1 - exp(-step / ramp))."""
  return decay * (1.0 - jnp.exp(-step.astype(jnp.float32) / ramp_steps))


def ema_update(ema_tree, new_tree, decay):
  """ema <- decay * ema + (1 - decay) * new, leaf-wise over floating leaves."""
  return jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, ema_tree, new_tree)
