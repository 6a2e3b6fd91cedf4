"""Tests for rsepm_jax.models.rsepm and rsepm_jax.models.decoder (spec 1.2, 1.3)."""
import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax.models import decoder
from rsepm_jax.models import rsepm

NUM_CLASSES = 6
SHAPE = (2, 64, 64, 3)


def _tiny_net(**kwargs):
  return rsepm.RSEPMNet(num_classes=NUM_CLASSES, backbone="tiny", backbone_width=8,
                        decoder_channels=16, low_level_channels=8, **kwargs)


def _abstract_init(model):
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                        jax.ShapeDtypeStruct(SHAPE, jnp.float32))


@pytest.fixture(scope="module")
def net_and_variables():
  """Tiny net with numpy-drawn variables (cheaper than compiling `init` on CPU)."""
  model = _tiny_net()
  _, abstract = _abstract_init(model)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, math.sqrt(2 / math.prod(leaf.shape[:-1])), leaf.shape)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)  # bias, mean

  variables = jax.tree_util.tree_map_with_path(
      lambda p, leaf: jnp.asarray(draw(p, leaf), jnp.float32), abstract)
  return model, variables


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)


def test_output_keys_and_shapes():
  outputs, _ = _abstract_init(_tiny_net())
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), outputs)
  f32 = jnp.dtype(jnp.float32)
  assert shapes == {
      "cams": ((2, 4, 4, NUM_CLASSES), f32),
      "cls_logits": ((2, NUM_CLASSES), f32),
      "features": {"C1": ((2, 16, 16, 8), f32), "C2": ((2, 16, 16, 32), f32),
                   "C3": ((2, 8, 8, 64), f32), "C4": ((2, 4, 4, 128), f32),
                   "C5": ((2, 4, 4, 256), f32)},
      "seg_logits": ((2, 16, 16, NUM_CLASSES + 1), f32),
  }


def test_without_decoder_has_no_decoder_outputs_or_params():
  outputs, variables = _abstract_init(_tiny_net(with_decoder=False))
  assert "seg_logits" not in outputs
  assert set(variables["params"]) == {"backbone", "classifier"}


def test_bfloat16_compute_keeps_float32_params_and_logits():
  outputs, variables = _abstract_init(_tiny_net(dtype=jnp.bfloat16))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert outputs["features"]["C5"].dtype == jnp.bfloat16
  assert outputs["cams"].dtype == outputs["seg_logits"].dtype == jnp.float32


def test_unknown_backbone_lists_choices():
  with pytest.raises(ValueError, match="'resnet18'.*resnet50.*resnet101.*tiny"):
    _abstract_init(_tiny_net().clone(backbone="resnet18"))


def test_bias_free_heads_and_submodule_names():
  _, variables = _abstract_init(_tiny_net())
  params = variables["params"]
  assert set(params) == {"backbone", "classifier", "aspp", "decoder"}
  assert set(params["classifier"]) == {"kernel"}
  assert params["classifier"]["kernel"].shape == (1, 1, 256, NUM_CLASSES)
  assert set(params["decoder"]["classifier"]) == {"kernel"}
  assert params["decoder"]["classifier"]["kernel"].shape == (3, 3, 16, NUM_CLASSES + 1)
  # ASPP: 1x1 + 3 dilated 3x3 + image pool, projected from 5 * 16 channels.
  assert params["aspp"]["project"]["conv"]["kernel"].shape == (1, 1, 80, 16)
  assert params["decoder"]["conv1"]["conv"]["kernel"].shape == (3, 3, 16 + 8, 16)


def test_init_follows_pytorch_defaults():
  """Conv U(+-1/sqrt(fan_in)); BN scale 1, bias 0, running mean 0, var 1 (spec 1.1)."""
  block = decoder.ConvBlock(16, 3)
  with jax.threefry_partitionable(False):  # compiles several times faster on CPU
    variables = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 80)))
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  assert set(flat) == {"conv/kernel", "bn/scale", "bn/bias"}
  kernel = np.asarray(flat["conv/kernel"])
  bound = 1 / math.sqrt(math.prod(kernel.shape[:-1]))
  assert np.abs(kernel).max() <= bound
  assert np.isclose(kernel.std(), bound / math.sqrt(3), rtol=0.1)
  np.testing.assert_array_equal(flat["bn/scale"], np.ones(16))
  np.testing.assert_array_equal(flat["bn/bias"], np.zeros(16))
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], np.zeros(16))
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["var"], np.ones(16))


def test_cls_logits_are_gap_of_cams(net_and_variables, images):
  model, variables = net_and_variables
  outputs = jax.jit(model.apply)(variables, images)
  np.testing.assert_allclose(outputs["cls_logits"], np.mean(outputs["cams"], axis=(1, 2)),
                             rtol=1e-6, atol=1e-6)
  # GAP commutes with the bias-free 1x1 classifier (spec 1.2).
  kernel = variables["params"]["classifier"]["kernel"][0, 0]
  pooled = np.mean(np.asarray(outputs["features"]["C5"], np.float64), axis=(1, 2))
  np.testing.assert_allclose(outputs["cls_logits"], pooled @ kernel, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_train(net_and_variables, images):
  model, variables = net_and_variables
  evaluate = jax.jit(model.apply)  # no 'dropout' rng: would raise if dropout were active
  first, second = evaluate(variables, images), evaluate(variables, images)
  np.testing.assert_array_equal(first["seg_logits"], second["seg_logits"])

  @jax.jit
  def train_outputs(dropout_key):
    outputs, _ = model.apply(variables, images, train=True, rngs={"dropout": dropout_key},
                             mutable=["batch_stats"])
    return outputs

  with jax.threefry_partitionable(False):  # compiles several times faster on CPU
    a, b = train_outputs(jax.random.key(1)), train_outputs(jax.random.key(2))
  np.testing.assert_array_equal(a["cams"], b["cams"])  # no dropout on the CAM path
  assert not np.allclose(a["seg_logits"], b["seg_logits"])
  assert not np.allclose(a["cams"], first["cams"])  # train uses batch statistics


def test_normalized_cam():
  rng = np.random.default_rng(0)
  positive = rng.uniform(0.1, 5.0, size=(2, 4, 5, 3))
  negative = -rng.uniform(0.1, 5.0, size=(2, 4, 5, 3))
  cams = np.concatenate([positive, negative], axis=-1)
  cams[0, 1, 2, 1] = -3.0  # negatives inside a positive map become 0
  normalized = np.asarray(rsepm.normalized_cam(jnp.asarray(cams, jnp.float32)))
  np.testing.assert_allclose(normalized[..., :3].max(axis=(1, 2)), 1.0, atol=1e-4)
  np.testing.assert_array_equal(normalized[..., 3:], 0.0)
  assert normalized[0, 1, 2, 1] == 0.0
  expected = positive[1, 3, 4, 2] / (positive[1, :, :, 2].max() + 1e-5)
  np.testing.assert_allclose(normalized[1, 3, 4, 2], expected, rtol=1e-5)

