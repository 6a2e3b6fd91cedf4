"""The model built from a config, and the train state: a plain dict pytree.

    state = {"step": int32 [], "params", "batch_stats", "opt_state",
             "ema_params", "ema_batch_stats"}

Evaluation and prediction use `eval_variables(state, use_ema)`.
"""
from absl import logging
import jax
import jax.numpy as jnp

from rsepm_jax import parallel
from rsepm_jax.models import convert
from rsepm_jax.models import networks

def prng_key(seed):
  """The run's root PRNG key.

  RBG rather than threefry: on CPU, jax 0.10 compiles threefry draws (parameter init, dropout)
  about 5x more slowly, and RBG is the fast generator on TPU too.
  """
  return jax.random.key(seed, impl="rbg")


def build_model(config, bn_axis_name=None):
  """The network of `config.model.arch` from `config.model` and `config.data.num_classes`
  (`networks.from_config`)."""
  return networks.from_config(config, bn_axis_name)


def backbone_depth(backbone):
  """Depth of a `config.model.backbone` with ImageNet weights (resnet50 -> 50, resnest269 ->
  269), None for "tiny"."""
  return {"resnet50": 50, "resnet101": 101, "resnest50": 50, "resnest101": 101,
          "resnest200": 200, "resnest269": 269}.get(backbone)


def init_variables(model, config, rng, pretrained=True):
  """Fresh variables for `model` on a crop-sized input, with ImageNet weights if configured."""
  size = config.data.crop_size
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3)), train=False))(rng)
  variables = dict(variables)
  if pretrained and config.model.init_from:
    depth = backbone_depth(config.model.backbone)
    if depth is None:
      raise ValueError(
          f"config.model.init_from is set but config.model.backbone={config.model.backbone!r} "
          "has no ImageNet weights; use a resnet or resnest backbone.")
    logging.info("Loading weights from %s", config.model.init_from)
    family = "resnest" if config.model.backbone.startswith("resnest") else "resnet"
    variables = convert.load_into(variables, config.model.init_from, depth, family)
  return variables


def create_train_state(model, tx, config, rng, mesh, pretrained=True):
  """Replicated train state on `mesh`; EMA starts equal to the initial weights."""
  variables = init_variables(model, config, rng, pretrained)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": tx.init(params),
      # Copies, not aliases: the step donates the whole state.
      "ema_params": jax.tree.map(jnp.copy, params),
      "ema_batch_stats": jax.tree.map(jnp.copy, batch_stats),
  }
  return parallel.replicate(state, mesh)


def eval_variables(state, use_ema=True):
  """Variables for `model.apply` in eval mode: the EMA copy by default (spec 7.1)."""
  if use_ema:
    return {"params": state["ema_params"], "batch_stats": state["ema_batch_stats"]}
  return {"params": state["params"], "batch_stats": state["batch_stats"]}
