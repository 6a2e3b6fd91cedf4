"""Tests for rsepm_jax.models.convert (spec 1.1 weights)."""
import importlib.util
import logging
import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from rsepm_jax.models import convert
from rsepm_jax.models import resnet
from rsepm_jax.models import rsepm

RESNET50_STAGES = (3, 4, 6, 3)
RESNET101_STAGES = (3, 4, 23, 3)


def _torchvision_resnet50_state_dict(seed, stages=RESNET50_STAGES, base_width=64):
  """Random weights under torchvision's exact ResNet-50 keys and OIHW shapes, `fc` included
  (`stages=RESNET101_STAGES` for ResNet-101's keys; a small `base_width` for small arrays).

  He-scaled kernels, running_var in [0.5, 1.5] and small bn3 scales keep the 16 residual
  additions from blowing activations up.
  """
  rng = np.random.default_rng(seed)
  state_dict = {}

  def conv(key, out_channels, in_channels, size):
    std = math.sqrt(2 / (in_channels * size * size))
    state_dict[f"{key}.weight"] = rng.normal(
        0, std, (out_channels, in_channels, size, size)).astype(np.float32)

  def bn(key, channels, scale=(0.5, 1.5)):
    state_dict[f"{key}.weight"] = rng.uniform(*scale, channels).astype(np.float32)
    state_dict[f"{key}.bias"] = rng.normal(0, 0.1, channels).astype(np.float32)
    state_dict[f"{key}.running_mean"] = rng.normal(0, 0.1, channels).astype(np.float32)
    state_dict[f"{key}.running_var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    state_dict[f"{key}.num_batches_tracked"] = np.array(100, np.int64)

  conv("conv1", base_width, 3, 7)
  bn("bn1", base_width)
  in_channels = base_width
  for stage, num_blocks in enumerate(stages):
    width = base_width * 2**stage
    for block in range(num_blocks):
      prefix = f"layer{stage + 1}.{block}"
      conv(f"{prefix}.conv1", width, in_channels, 1)
      bn(f"{prefix}.bn1", width)
      conv(f"{prefix}.conv2", width, width, 3)
      bn(f"{prefix}.bn2", width)
      conv(f"{prefix}.conv3", 4 * width, width, 1)
      bn(f"{prefix}.bn3", 4 * width, scale=(0.1, 0.4))
      if block == 0:
        conv(f"{prefix}.downsample.0", 4 * width, in_channels, 1)
        bn(f"{prefix}.downsample.1", 4 * width)
      in_channels = 4 * width
  state_dict["fc.weight"] = rng.normal(0, 0.01, (1000, in_channels)).astype(np.float32)
  state_dict["fc.bias"] = np.zeros(1000, np.float32)
  return state_dict


def _conv_nchw(x, weight, stride=1, padding=0):
  """im2col convolution, x [B, C, H, W] float64, weight [O, I, kh, kw] (PyTorch layout)."""
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  _, _, kh, kw = weight.shape
  out_h = (x.shape[2] - kh) // stride + 1
  out_w = (x.shape[3] - kw) // stride + 1
  columns = np.empty(x.shape[:2] + (kh, kw, out_h, out_w))
  for i in range(kh):
    for j in range(kw):
      columns[:, :, i, j] = x[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
  return np.einsum("bcijhw,ocij->bohw", columns, weight)


def _reference_resnet50_c5(state_dict, images_nchw):
  """torchvision ResNet-50 forward in eval mode, layer4 stride 1 (OS16, last_stride 1)."""
  sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}

  def bn(x, key):
    scale = sd[f"{key}.weight"] / np.sqrt(sd[f"{key}.running_var"] + 1e-5)
    shift = sd[f"{key}.bias"] - sd[f"{key}.running_mean"] * scale
    return x * scale[:, None, None] + shift[:, None, None]

  relu = lambda x: np.maximum(x, 0)
  x = relu(bn(_conv_nchw(images_nchw, sd["conv1.weight"], 2, 3), "bn1"))
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  out_h, out_w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
  x = np.max([x[:, :, i:i + 2 * out_h:2, j:j + 2 * out_w:2]
              for i in range(3) for j in range(3)], axis=0)
  for stage, num_blocks in enumerate(RESNET50_STAGES):
    for block in range(num_blocks):
      p = f"layer{stage + 1}.{block}"
      stride = 2 if block == 0 and stage in (1, 2) else 1
      y = relu(bn(_conv_nchw(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
      y = relu(bn(_conv_nchw(y, sd[f"{p}.conv2.weight"], stride, 1), f"{p}.bn2"))
      y = bn(_conv_nchw(y, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
      if block == 0:
        x = bn(_conv_nchw(x, sd[f"{p}.downsample.0.weight"], stride), f"{p}.downsample.1")
      x = relu(x + y)
  return x


@pytest.fixture(scope="module")
def state_dict():
  return _torchvision_resnet50_state_dict(seed=0)


@pytest.fixture(scope="module")
def converted(state_dict):
  return convert.from_torchvision(state_dict, 50)


def _flat(variables):
  return traverse_util.flatten_dict(variables, sep="/")


def test_converted_resnet50_matches_numpy_reference(state_dict, converted):
  images = np.random.default_rng(1).normal(size=(1, 32, 32, 3))
  c5 = jax.jit(resnet.resnet(50).apply)(converted, jnp.asarray(images, jnp.float32))["C5"]
  reference = _reference_resnet50_c5(state_dict, images.transpose(0, 3, 1, 2))
  reference = reference.transpose(0, 2, 3, 1)
  assert c5.shape == reference.shape == (1, 2, 2, 2048)
  assert np.all(np.isfinite(reference)) and np.abs(reference).max() > 0
  relative_error = np.abs(np.asarray(c5) - reference).max() / np.abs(reference).max()
  assert relative_error < 1e-4


def test_layout_of_converted_variables(state_dict, converted):
  flat = _flat(converted)
  np.testing.assert_array_equal(flat["params/layer2_0/conv2/kernel"],
                                state_dict["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat["params/layer3_0/downsample_bn/scale"],
                                state_dict["layer3.0.downsample.1.weight"])
  np.testing.assert_array_equal(flat["batch_stats/layer4_2/bn3/var"],
                                state_dict["layer4.2.bn3.running_var"])


def test_fc_is_reported_as_unexpected_not_failing(state_dict, converted, caplog):
  assert convert.compare_keys(state_dict, 50) == ([], ["fc.bias", "fc.weight"])
  with caplog.at_level(logging.INFO):
    convert.from_torchvision(state_dict, 50)
  assert "fc.weight" in caplog.text


def test_shape_mismatch_names_key_and_shapes(state_dict):
  broken = dict(state_dict)
  broken["layer2.0.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight.*\(128, 128, 1, 1\).*"
                                       r"\(128, 128, 3, 3\)"):
    convert.from_torchvision(broken, 50)


def test_missing_key_raises(state_dict):
  broken = {k: v for k, v in state_dict.items() if k != "layer3.1.bn2.running_var"}
  with pytest.raises(ValueError, match=r"layer3\.1\.bn2\.running_var"):
    convert.from_torchvision(broken, 50)


def test_safetensors_round_trip_strips_prefix(state_dict, tmp_path):
  path = tmp_path / "resnet50.safetensors"
  safetensors.numpy.save_file({f"module.{k}": v for k, v in state_dict.items()}, str(path))
  loaded = convert.load_state_dict(path)
  assert set(loaded) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(loaded[key], value)


def test_cli_npz_loads_back_equal(state_dict, converted, tmp_path, capsys):
  src, dst = tmp_path / "resnet50.safetensors", tmp_path / "resnet50.npz"
  safetensors.numpy.save_file(state_dict, str(src))
  convert.convert_file(str(src), str(dst), 50)
  assert "fc.weight" in capsys.readouterr().out
  loaded, expected = convert.load_state_dict(dst), _flat(converted)
  assert set(loaded) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(loaded[key], value)

  # load_into accepts both the converted .npz and the original checkpoint.
  model = rsepm.RSEPMNet(num_classes=3, decoder_channels=8, low_level_channels=8)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  for path in (dst, src):
    merged = convert.load_into(variables, path, 50)
    assert merged["params"]["classifier"] is variables["params"]["classifier"]
    assert merged["params"]["decoder"] is variables["params"]["decoder"]
    for key, value in _flat({"params": merged["params"]["backbone"],
                             "batch_stats": merged["batch_stats"]["backbone"]}).items():
      np.testing.assert_array_equal(value, expected[key])


def test_load_into_rejects_a_different_backbone(state_dict, tmp_path):
  path = tmp_path / "resnet50.safetensors"
  safetensors.numpy.save_file(state_dict, str(path))
  model = rsepm.RSEPMNet(num_classes=3, backbone="tiny", with_decoder=False)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  with pytest.raises(ValueError, match="params/backbone"):
    convert.load_into(variables, path, 50)


def test_bad_paths_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.safetensors"):
    convert.load_state_dict(tmp_path / "missing.safetensors")
  (tmp_path / "weights.bin").write_bytes(b"")
  with pytest.raises(ValueError, match=r"weights\.bin.*\.safetensors"):
    convert.load_state_dict(tmp_path / "weights.bin")
  if importlib.util.find_spec("torch") is None:
    (tmp_path / "resnet50.pth").write_bytes(b"")
    with pytest.raises(ImportError, match=r"resnet50\.pth.*safetensors"):
      convert.load_state_dict(tmp_path / "resnet50.pth")


@pytest.mark.parametrize("stages,depth,message", [
    (RESNET101_STAGES, 50, r"this looks like a ResNet-101 checkpoint \(config\.model\.backbone=resnet50\)"),
    (RESNET50_STAGES, 101, r"this looks like a ResNet-50 checkpoint \(config\.model\.backbone=resnet101\)"),
])
def test_depth_mismatch_names_the_checkpoint_depth(stages, depth, message, tmp_path):
  state_dict = _torchvision_resnet50_state_dict(seed=0, stages=stages, base_width=1)
  with pytest.raises(ValueError, match=message) as error:
    convert.from_torchvision(state_dict, depth)
  assert len(str(error.value)) < 600  # names the depth instead of listing the 100+ keys
  path = tmp_path / "weights.safetensors"
  safetensors.numpy.save_file(state_dict, str(path))
  with pytest.raises(ValueError, match=message):
    convert.load_backbone_variables(path, depth)


def test_depth_mismatch_of_a_converted_npz(converted, tmp_path):
  path = tmp_path / "resnet50.npz"
  np.savez(path, **_flat(converted))
  with pytest.raises(ValueError, match=r"resnet50\.npz: this looks like a ResNet-50 checkpoint"):
    convert.load_backbone_variables(path, 101)


def test_wrapped_state_dicts_are_unwrapped(state_dict):
  for wrapper in ("state_dict", "model"):
    assert convert.unwrap_state_dict({wrapper: state_dict, "epoch": 90}, "x.pth") is state_dict
  assert convert.unwrap_state_dict({**state_dict, "epoch": 90}, "x.pth").keys() == state_dict.keys()
  with pytest.raises(ValueError, match=r"x\.pth holds no weights.*'epoch', 'optimizer'"):
    convert.unwrap_state_dict({"optimizer": {"lr": 0.1}, "epoch": 90}, "x.pth")


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_pth_loads(state_dict, converted, wrapper, tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "checkpoint.pth"
  tensors = {f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}
  torch.save({wrapper: tensors, "epoch": 90}, str(path))
  loaded = convert.load_backbone_variables(path, 50)
  for key, value in _flat(converted).items():
    np.testing.assert_array_equal(_flat(loaded)[key], value)


def test_cli_safetensors_output_drops_fc_and_loads_back(state_dict, converted, tmp_path):
  src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
  safetensors.numpy.save_file({f"model.{k}": v for k, v in state_dict.items()}, str(src))
  convert.convert_file(str(src), str(dst), 50)
  written = safetensors.numpy.load_file(str(dst))
  assert "fc.weight" not in written and "conv1.weight" in written
  assert not any(k.endswith("num_batches_tracked") for k in written)
  for key, value in written.items():
    np.testing.assert_array_equal(value, state_dict[key])
  for key, value in _flat(convert.load_backbone_variables(dst, 50)).items():
    np.testing.assert_array_equal(value, _flat(converted)[key])
