"""Tests for rsepm_jax.models.resnet (spec 1.1)."""
import math

import flax.linen as nn
from flax import traverse_util
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax.models import resnet


def _abstract_init(model, shape):
  """(features, variables) of `model` on an input of `shape`, as ShapeDtypeStructs."""
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _random_variables(model, shape, seed):
  """He-scaled kernels and non-trivial BN parameters / statistics, drawn with numpy."""
  rng = np.random.default_rng(seed)
  _, abstract = _abstract_init(model, shape)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, math.sqrt(2 / math.prod(leaf.shape[:-1])), leaf.shape)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)  # bias, mean

  return jax.tree_util.tree_map_with_path(
      lambda p, leaf: jnp.asarray(draw(p, leaf), jnp.float32), abstract)


@pytest.mark.parametrize("output_stride, sizes", [
    (16, {"C1": 128, "C2": 128, "C3": 64, "C4": 32, "C5": 32}),
    (8, {"C1": 128, "C2": 128, "C3": 64, "C4": 64, "C5": 64}),
])
def test_resnet50_feature_shapes(output_stride, sizes):
  features, _ = _abstract_init(resnet.resnet(50, output_stride=output_stride, last_stride=1),
                               (1, 512, 512, 3))
  channels = {"C1": 64, "C2": 256, "C3": 512, "C4": 1024, "C5": 2048}
  assert {k: f.shape for k, f in features.items()} == {
      k: (1, sizes[k], sizes[k], channels[k]) for k in sizes}


def test_last_stride_two_gives_stride_32():
  features, _ = _abstract_init(resnet.resnet(50, last_stride=2), (1, 64, 64, 3))
  assert features["C5"].shape == (1, 2, 2, 2048)


@pytest.mark.parametrize("depth, count", [(50, 23_508_032), (101, 42_500_160)])
def test_param_count_matches_torchvision_without_fc(depth, count):
  _, variables = _abstract_init(resnet.resnet(depth), (1, 32, 32, 3))
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == count


def test_bad_depth_and_output_stride_raise():
  with pytest.raises(ValueError, match=r"\[50, 101\].*34"):
    resnet.resnet(34)
  with pytest.raises(ValueError, match="output_stride must be 8 or 16, got 32"):
    _abstract_init(resnet.resnet(50, output_stride=32), (1, 32, 32, 3))


def test_first_block_of_each_stage_is_undilated():
  """OS8: layer3/layer4 block 0 use dilation 1, later blocks 2 and 4 (spec 1.1 quirk)."""
  model = resnet.ResNet(stage_sizes=(1, 1, 2, 2), width=4, output_stride=8)
  shape = (1, 64, 64, 3)
  variables = _random_variables(model, shape, seed=0)
  watched = ("layer3_0", "layer3_1", "layer4_0", "layer4_1")

  @jax.jit
  def conv2_inputs_and_outputs(variables, images):
    captured = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = context.module.scope.path
      if len(path) == 2 and path[0] in watched and path[1] == "conv2":
        captured[path[0]] = (args[0], out)
      return out

    with nn.intercept_methods(record):
      model.apply(variables, images)
    return captured

  images = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  captured = conv2_inputs_and_outputs(variables, images)
  params = variables["params"]
  for block, dilation in zip(watched, (1, 2, 1, 4)):
    x, out = captured[block]
    assert x.shape[1:3] == (8, 8)
    for d in (1, 2, 4):
      reference = lax.conv_general_dilated(
          x, params[block]["conv2"]["kernel"], window_strides=(1, 1),
          padding=((d, d), (d, d)), rhs_dilation=(d, d),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      assert np.allclose(out, reference, rtol=1e-5, atol=1e-5) == (d == dilation), (block, d)


def _numpy_stem(images, conv_weight_hwio, bn):
  """PyTorch stem on NHWC float64: conv7x7/2 pad 3, BN (running stats), ReLU, maxpool3x3/2 pad 1."""
  x = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)))
  b, h, w, _ = x.shape
  out_h, out_w = (h - 7) // 2 + 1, (w - 7) // 2 + 1
  y = np.zeros((b, out_h, out_w, conv_weight_hwio.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, 2 * i:2 * i + 7, 2 * j:2 * j + 7, :]
      y[:, i, j] = np.einsum("bhwc,hwco->bo", patch, conv_weight_hwio)
  y = (y - bn["mean"]) / np.sqrt(bn["var"] + 1e-5) * bn["scale"] + bn["bias"]
  y = np.maximum(y, 0)
  y = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out_h, out_w = (y.shape[1] - 3) // 2 + 1, (y.shape[2] - 3) // 2 + 1
  pooled = np.full((b, out_h, out_w, y.shape[-1]), -np.inf)
  for i in range(out_h):
    for j in range(out_w):
      pooled[:, i, j] = y[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
  return pooled


def test_stem_padding_matches_pytorch():
  """Odd height, even width: Flax 'SAME' would pad the even side (2, 3) and (0, 1)."""
  model = resnet.tiny_resnet(width=8)
  shape = (2, 19, 22, 3)
  variables = _random_variables(model, shape, seed=2)
  images = np.random.default_rng(3).normal(size=shape)
  c1 = jax.jit(model.apply)(variables, jnp.asarray(images, jnp.float32))["C1"]
  params, stats = variables["params"], variables["batch_stats"]
  bn = {k: np.asarray(v, np.float64) for k, v in {**params["bn1"], **stats["bn1"]}.items()}
  reference = _numpy_stem(images, np.asarray(params["conv1"]["kernel"], np.float64), bn)
  assert c1.shape == reference.shape == (2, 5, 6, 8)
  np.testing.assert_allclose(c1, reference, rtol=1e-4, atol=1e-4)


def test_names_follow_torchvision():
  _, variables = _abstract_init(resnet.resnet(50), (1, 32, 32, 3))
  names = {"/".join(p) for p in traverse_util.flatten_dict(variables["params"])}
  assert {"conv1/kernel", "bn1/scale", "layer1_0/downsample_conv/kernel",
          "layer1_0/downsample_bn/bias", "layer4_2/conv3/kernel"} <= names
  assert "layer1_1/downsample_conv/kernel" not in names
  assert set(variables["batch_stats"]["layer2_3"]["bn2"]) == {"mean", "var"}


def test_cpu_conv_gradients_match_xla():
  """The CPU conv (kernel gradient as a matmul over the taps) gives XLA's gradients up to float
  summation order."""
  rng = np.random.default_rng(0)
  for size, kernel, stride, dilation in ((9, 3, 1, 1), (9, 3, 2, 1), (8, 1, 2, 1), (11, 7, 2, 1),
                                         (10, 3, 1, 2)):
    pad = ((dilation * (kernel // 2),) * 2,) * 2
    x = jnp.asarray(rng.normal(size=(2, size, size, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 7)), jnp.float32)

    def loss(conv, x, w):
      return jnp.sum(jnp.sin(conv(x, w)))

    xla = jax.grad(lambda x, w: loss(lambda a, b: lax.conv_general_dilated(
        a, b, (stride, stride), pad, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC")), x, w), (0, 1))(x, w)
    ours = jax.jit(jax.grad(lambda x, w: loss(lambda a, b: resnet.cpu_conv(
        a, b, (stride, stride), pad, rhs_dilation=(dilation, dilation)), x, w), (0, 1)))(x, w)
    np.testing.assert_allclose(ours[0], xla[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1], xla[1], rtol=1e-5, atol=1e-4)
