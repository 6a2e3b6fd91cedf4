"""Tests for rsepm_jax.models.resnest and convert.from_timm_resnest (spec A.1)."""
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from rsepm_jax import config_check
from rsepm_jax import state as state_lib
from rsepm_jax.configs import demo
from rsepm_jax.models import backbones
from rsepm_jax.models import convert
from rsepm_jax.models import resnest


def _numpy_bn(x, p, s):
  return (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]


def _numpy_split_attention(x, p, s, radix, width, dilation):
  """SplAtConv2d (cardinality 1) in eval mode, with explicit loops over the radix groups and the
  3x3 taps. x: [B, H, W, width]; p / s: the Flax params / batch stats."""
  batch, height, wide, _ = x.shape
  kernel = p["conv"]["kernel"]  # [3, 3, width / radix, radix * width]
  group_in = width // radix
  padded = np.pad(x, ((0, 0), (dilation, dilation), (dilation, dilation), (0, 0)))
  conv = np.zeros((batch, height, wide, radix * width))
  for group in range(radix):
    inputs = padded[..., group * group_in:(group + 1) * group_in]
    outputs = slice(group * width, (group + 1) * width)
    for i in range(3):
      for j in range(3):
        tap = inputs[:, i * dilation:i * dilation + height, j * dilation:j * dilation + wide]
        conv[..., outputs] += np.einsum("bhwc,co->bhwo", tap, kernel[i, j][:, outputs])
  conv = np.maximum(_numpy_bn(conv, p["bn0"], s["bn0"]), 0)
  splits = [conv[..., r * width:(r + 1) * width] for r in range(radix)]
  gap = sum(splits).mean(axis=(1, 2))  # [B, width]
  hidden = gap @ p["fc1"]["kernel"][0, 0] + p["fc1"]["bias"]
  hidden = np.maximum(_numpy_bn(hidden, p["bn1"], s["bn1"]), 0)
  logits = hidden @ p["fc2"]["kernel"][0, 0] + p["fc2"]["bias"]  # [B, radix * width]
  logits = [logits[:, r * width:(r + 1) * width] for r in range(radix)]
  total = sum(np.exp(l) for l in logits)
  return sum(split * (np.exp(l) / total)[:, None, None] for split, l in zip(splits, logits))


@pytest.mark.parametrize("dilation", [1, 2])
def test_split_attention_matches_numpy(dilation):
  width, radix = 8, 2
  module = resnest.SplitAttention(width, dilation=dilation, radix=radix)
  rng = np.random.default_rng(dilation)
  x = rng.normal(size=(2, 6, 5, width)).astype(np.float32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)
  assert abstract["params"]["fc1"]["kernel"].shape == (1, 1, width, 32)  # max(8 * 2 // 4, 32)
  assert abstract["params"]["conv"]["kernel"].shape == (3, 3, width // radix, radix * width)

  def draw(path, leaf):
    low = 0.5 if path[-1].key in ("scale", "var") else -1.0
    return rng.uniform(low, 1.5 if low > 0 else 1.0, leaf.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  got = module.apply(variables, x, train=False)
  want = _numpy_split_attention(x.astype(np.float64), variables["params"],
                                variables["batch_stats"], radix, width, dilation)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_resnest_shapes_and_registry():
  for kind, c1 in (("resnest50", 64), ("resnest101", 128)):
    assert kind in backbones.BACKBONES and state_lib.backbone_depth(kind)
    model = backbones.backbone(kind, output_stride=16)
    assert isinstance(model, resnest.ResNeSt)
    features, variables = jax.eval_shape(
        lambda x, m=model: m.init_with_output(jax.random.key(0), x),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    shapes = {name: f.shape for name, f in features.items()}
    assert shapes == {"C1": (1, 16, 16, c1), "C2": (1, 16, 16, 256), "C3": (1, 8, 8, 512),
                      "C4": (1, 4, 4, 1024), "C5": (1, 4, 4, 2048)}
  # Without the 1000-way fc: 27.48M (timm resnest50d) - 2.05M.
  params = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(
      convert.abstract_resnest_variables(50)["params"]))
  assert params == 27_483_240 - (2048 * 1000 + 1000)


@pytest.mark.parametrize("output_stride, last_stride, want", [
    (16, 1, ((1, 2, 2, 1), (1, 1, 1, 2))),  # Puzzle-CAM's dilated=False, dilation=2
    (8, 1, ((1, 2, 1, 1), (1, 1, 2, 4))),  # dilated=True
    (16, 2, ((1, 2, 2, 2), (1, 1, 1, 1)))])  # the ImageNet network
def test_stage_strides_and_dilations(output_stride, last_stride, want):
  assert resnest.stage_strides_and_dilations(output_stride, last_stride) == want


def _conv_calls(model, size):
  """[(module path, kernel size, dilation, strides)] of every conv of `model`, in call order,
  and its features, on a [1, size, size, 3] input (abstract evaluation)."""
  calls = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == "__call__":
      calls.append(("/".join(module.path), module.kernel_size[0], module.kernel_dilation,
                    module.strides))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    features, _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                                 jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return calls, features


def test_os16_dilations_and_odd_input():
  """Layer4 is dilated 2 except its first block; only the stem's first conv is strided (avd
  pools stride the blocks); the ceil-mode shortcut pools match the avd pools on odd sizes."""
  model = resnest.ResNeSt(stage_sizes=(1, 1, 1, 2), stem_width=4, width=4)
  calls, features = _conv_calls(model, 33)
  assert {k: v.shape[1:3] for k, v in features.items()} == {
      "C1": (9, 9), "C2": (9, 9), "C3": (5, 5), "C4": (3, 3), "C5": (3, 3)}
  dilated_3x3 = {path: dilation for path, k, dilation, _ in calls if k == 3}
  assert dilated_3x3 == {"conv1_0": 1, "conv1_3": 1, "conv1_6": 1, "layer1_0/conv2/conv": 1,
                         "layer2_0/conv2/conv": 1, "layer3_0/conv2/conv": 1,
                         "layer4_0/conv2/conv": 1, "layer4_1/conv2/conv": 2}
  assert [path for path, _, _, strides in calls if strides != 1] == ["conv1_0"]


def test_ceil_avg_pool_by_hand():
  """PyTorch AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) on a 3x3 image."""
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)  # rows [0 1 2], [3 4 5], [6 7 8]
  got = resnest._ceil_avg_pool(x, 2)[0, ..., 0]
  np.testing.assert_allclose(got, [[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2], [(6 + 7) / 2, 8]])


def _timm_resnest_state_dict(depth, rng):
  """A fake timm `resnest{depth}` state dict from the key rules, random values."""
  stem = {50: 32}.get(depth, 64)
  shapes = {}

  def conv(name, out, inp, k):
    shapes[f"{name}.weight"] = (out, inp, k, k)

  def bn(name, n):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.{leaf}"] = (n,)
    shapes[f"{name}.num_batches_tracked"] = ()

  conv("conv1.0", stem, 3, 3)
  bn("conv1.1", stem)
  conv("conv1.3", stem, stem, 3)
  bn("conv1.4", stem)
  conv("conv1.6", 2 * stem, stem, 3)
  bn("bn1", 2 * stem)
  inplanes = 2 * stem
  for stage, blocks in enumerate(resnest.STAGE_SIZES[depth]):
    width = 64 * 2**stage
    for block in range(blocks):
      prefix = f"layer{stage + 1}.{block}"
      conv(f"{prefix}.conv1", width, inplanes, 1)
      bn(f"{prefix}.bn1", width)
      conv(f"{prefix}.conv2.conv", 2 * width, width // 2, 3)
      bn(f"{prefix}.conv2.bn0", 2 * width)
      inter = max(width // 2, 32)
      conv(f"{prefix}.conv2.fc1", inter, width, 1)
      shapes[f"{prefix}.conv2.fc1.bias"] = (inter,)
      bn(f"{prefix}.conv2.bn1", inter)
      conv(f"{prefix}.conv2.fc2", 2 * width, inter, 1)
      shapes[f"{prefix}.conv2.fc2.bias"] = (2 * width,)
      conv(f"{prefix}.conv3", 4 * width, width, 1)
      bn(f"{prefix}.bn3", 4 * width)
      if block == 0:
        conv(f"{prefix}.downsample.1", 4 * width, inplanes, 1)
        bn(f"{prefix}.downsample.2", 4 * width)
      inplanes = 4 * width
  shapes["fc.weight"], shapes["fc.bias"] = (1000, inplanes), (1000,)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _flax_path(key):
  """Our variable path of a timm key: "layer1.0.conv2.fc1.weight" ->
  ("params", "layer1_0", "conv2", "fc1", "kernel")."""
  parts = key.split(".")
  modules, leaf = parts[:-1], parts[-1]
  merged = []
  for part in modules:
    if part.isdigit():
      merged[-1] += f"_{part}"
    else:
      merged.append(part)
  is_bn = merged[-1].startswith("bn") or merged[-1] in ("conv1_1", "conv1_4", "downsample_2")
  collection, name = {
      "weight": ("params", "scale" if is_bn else "kernel"), "bias": ("params", "bias"),
      "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}[leaf]
  return (collection, *merged, name)


def test_from_timm_resnest_places_every_tensor_once():
  state_dict = _timm_resnest_state_dict(50, np.random.default_rng(0))
  variables = convert.from_timm_resnest(state_dict, 50)
  flat = {}
  for collection in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      flat[(collection, *(k.key for k in path))] = value
  used = [k for k in state_dict if not k.startswith("fc.") and "num_batches" not in k]
  assert len(flat) == len(used)
  for key in used:
    value = flat.pop(_flax_path(key))
    want = state_dict[key]
    np.testing.assert_array_equal(value, want.transpose(2, 3, 1, 0) if want.ndim == 4 else want)
  assert not flat
  abstract = convert.abstract_resnest_variables(50)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, abstract)


def test_from_timm_resnest_names_bad_keys():
  state_dict = _timm_resnest_state_dict(50, np.random.default_rng(1))
  del state_dict["layer2.0.conv2.fc2.bias"]
  state_dict["layer1.0.conv2.extra.weight"] = np.zeros((1,), np.float32)
  state_dict["layer3.1.conv3.weight"] = np.zeros((1024, 128, 1, 1), np.float32)
  with pytest.raises(convert.WeightsError) as error:
    convert.from_timm_resnest(state_dict, 50, where="r50.pth")
  message = str(error.value)
  for name in ("r50.pth", "1 missing keys: ['layer2.0.conv2.fc2.bias']",
               "1 unexpected keys: ['layer1.0.conv2.extra.weight']",
               "layer3.1.conv3.weight: checkpoint (1024, 128, 1, 1), model (1024, 256, 1, 1)"):
    assert name in message


def test_config_and_init_from_resnest(tmp_path):
  """config.model.backbone="resnest50" with init_from validates, and `load_into` with the
  "resnest" family fills the backbone from a timm .safetensors and from its converted .npz."""
  config = demo.get_config()
  config.model.backbone = "resnest50"
  config.model.init_from = str(tmp_path / "resnest50.safetensors")
  config_check.validate(config)
  state_dict = _timm_resnest_state_dict(50, np.random.default_rng(2))
  (tmp_path / "resnest50.safetensors").write_bytes(safetensors.numpy.save(state_dict))
  abstract = convert.abstract_resnest_variables(50)
  variables = {c: {"backbone": jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract[c]),
                   "classifier": {"kernel": np.ones((1, 1, 2048, 20), np.float32)}}
               for c in ("params", "batch_stats")}
  loaded = convert.load_into(variables, config.model.init_from, 50, "resnest")
  np.testing.assert_array_equal(loaded["params"]["backbone"]["layer4_2"]["conv2"]["fc2"]["bias"],
                                state_dict["layer4.2.conv2.fc2.bias"])
  np.testing.assert_array_equal(loaded["params"]["classifier"]["kernel"], 1)  # heads kept
  flat = traverse_util.flatten_dict(convert.from_timm_resnest(state_dict, 50), sep="/")
  np.savez(tmp_path / "resnest50.npz", **flat)
  from_npz = convert.load_into(variables, tmp_path / "resnest50.npz", 50, "resnest")
  np.testing.assert_array_equal(from_npz["batch_stats"]["backbone"]["bn1"]["var"],
                                state_dict["bn1.running_var"])
