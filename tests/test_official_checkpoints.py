"""Official single-stage RS+EPM checkpoints into `RSEPMNet` (`convert.from_official`).

The fake checkpoints follow the key list of docs `official_checkpoints.md` (RSEPM, ResNet-50,
OS16, feature_size 256): names, OIHW shapes and `num_batches_tracked` buffers, random values.
"""
import os
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from rsepm_jax import parallel
from rsepm_jax import state
from rsepm_jax import train
from rsepm_jax.configs import voc
from rsepm_jax.models import convert

RESNET_STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# Official head module -> ours, with (input channels, kernel size) of its conv (the doc's list).
CONV_BN_BLOCKS = {
    "aspp.aspp1": (("aspp", "branch_1x1"), 2048, 1),
    "aspp.aspp2": (("aspp", "branch_3x3_0"), 2048, 3),
    "aspp.aspp3": (("aspp", "branch_3x3_1"), 2048, 3),
    "aspp.aspp4": (("aspp", "branch_3x3_2"), 2048, 3),
    "aspp.global_avg_pool.1": (("aspp", "image_pool"), 2048, 1),
    "aspp.block.0": (("aspp", "project"), 1280, 1),
    "decoder.low_block": (("decoder", "low_level"), 256, 1),
    "decoder.classifier.0": (("decoder", "conv1"), 512, 3),
    "decoder.classifier.2": (("decoder", "conv2"), 256, 3),
}
BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


class FakeStateDict(dict):
  """A PyTorch-style state dict of random float32 tensors, filled by its methods."""

  def __init__(self, seed):
    super().__init__()
    self.rng = np.random.default_rng(seed)

  def conv(self, key, shape):
    """Conv weight `key` (OIHW `shape`), He-scaled."""
    fan_in = shape[1] * shape[2] * shape[3]
    self[key] = self.rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2 / fan_in))

  def bn(self, key, channels):
    """The five tensors of BatchNorm2d module `key`, num_batches_tracked included."""
    self[f"{key}.weight"] = self.rng.uniform(0.5, 1.5, channels).astype(np.float32)
    self[f"{key}.bias"] = self.rng.normal(0, 0.1, channels).astype(np.float32)
    self[f"{key}.running_mean"] = self.rng.normal(0, 0.1, channels).astype(np.float32)
    self[f"{key}.running_var"] = self.rng.uniform(0.5, 1.5, channels).astype(np.float32)
    self[f"{key}.num_batches_tracked"] = np.array(1000, np.int64)

  def torchvision_resnet(self, depth, prefix="model."):
    """torchvision's ResNet-`depth` without `fc`, keys under `prefix` (its naming rules: stem
    `conv1`/`bn1`, `layer{s}.{b}.conv{1,2,3}`/`bn{1,2,3}`, `downsample.0`/`.1` in each first
    block)."""
    self.conv(f"{prefix}conv1.weight", (64, 3, 7, 7))
    self.bn(f"{prefix}bn1", 64)
    in_channels = 64
    for stage, num_blocks in enumerate(RESNET_STAGES[depth]):
      width = 64 * 2**stage
      for block in range(num_blocks):
        name = f"{prefix}layer{stage + 1}.{block}"
        for i, (out_channels, size) in enumerate(((width, 1), (width, 3), (4 * width, 1)), 1):
          inputs = in_channels if i == 1 else width
          self.conv(f"{name}.conv{i}.weight", (out_channels, inputs, size, size))
          self.bn(f"{name}.bn{i}", out_channels)
        if block == 0:
          self.conv(f"{name}.downsample.0.weight", (4 * width, in_channels, 1, 1))
          self.bn(f"{name}.downsample.1", 4 * width)
        in_channels = 4 * width


def official_state_dict(num_classes=20, depth=50, seed=0):
  """Random tensors under the official RSEPM keys and shapes (docs: official_checkpoints.md)."""
  state_dict = FakeStateDict(seed)
  state_dict.torchvision_resnet(depth)
  state_dict.conv("classifier.weight", (num_classes, 2048, 1, 1))
  for module, (_, in_channels, size) in CONV_BN_BLOCKS.items():
    state_dict.conv(f"{module}.conv.weight", (256, in_channels, size, size))
    state_dict.bn(f"{module}.bn", 256)
  state_dict.conv("decoder.classifier.4.weight", (num_classes + 1, 256, 3, 3))
  return dict(state_dict)


def rsepm_config(**model):
  """configs/voc.py (ResNet-50, OS16, 20 classes, ASPP/decoder 256) in float32 with `model`
  overrides."""
  config = voc.get_config()
  config.data.crop_size = 64
  config.model.dtype = "float32"
  config.model.update(model)
  return config


@pytest.fixture(scope="module")
def official():
  return official_state_dict()


@pytest.fixture(scope="module")
def converted(official):
  return convert.from_official(official, rsepm_config())


def test_fake_checkpoint_has_the_documented_totals(official):
  # official_checkpoints.md: 318 tensors under `model.`, 374 (41.0 M values) in all.
  assert sum(key.startswith("model.") for key in official) == 318
  assert len(official) == 374
  assert round(sum(v.size for v in official.values()) / 1e6, 1) == 41.0


def test_variables_have_the_model_structure(converted):
  config = rsepm_config()
  model = state.build_model(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  given = {k: v.shape for k, v in traverse_util.flatten_dict(converted, sep="/").items()}
  assert given == expected
  assert all(v.dtype == np.float32 for v in traverse_util.flatten_dict(converted).values())


def test_every_official_tensor_lands_in_its_place(official, converted):
  """Head: every key by the doc's module table; conv kernels OIHW -> HWIO. Backbone: samples.
  Each official tensor (num_batches_tracked aside) is used exactly once."""
  params, stats = converted["params"], converted["batch_stats"]
  hwio = lambda key: official[key].transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(params["classifier"]["kernel"], hwio("classifier.weight"))
  np.testing.assert_array_equal(params["decoder"]["classifier"]["kernel"],
                                hwio("decoder.classifier.4.weight"))
  for module, ((parent, child), _, _) in CONV_BN_BLOCKS.items():
    np.testing.assert_array_equal(params[parent][child]["conv"]["kernel"],
                                  hwio(f"{module}.conv.weight"))
    for leaf, (collection, name) in BN_LEAVES.items():
      np.testing.assert_array_equal(converted[collection][parent][child]["bn"][name],
                                    official[f"{module}.bn.{leaf}"])
  oihw = lambda kernel: kernel.transpose(3, 2, 0, 1)
  backbone_params, backbone_stats = params["backbone"], stats["backbone"]
  backbone_samples = {
      "model.conv1.weight": oihw(backbone_params["conv1"]["kernel"]),
      "model.bn1.weight": backbone_params["bn1"]["scale"],
      "model.layer3.5.conv2.weight": oihw(backbone_params["layer3_5"]["conv2"]["kernel"]),
      "model.layer2.0.downsample.0.weight":
          oihw(backbone_params["layer2_0"]["downsample_conv"]["kernel"]),
      "model.layer4.0.downsample.1.running_var": backbone_stats["layer4_0"]["downsample_bn"]["var"],
      "model.layer4.2.bn3.running_mean": backbone_stats["layer4_2"]["bn3"]["mean"],
  }
  for key, value in backbone_samples.items():
    np.testing.assert_array_equal(value, official[key], err_msg=key)
  # Fingerprints that survive a transpose: each official tensor once, nothing else.
  fingerprint = lambda a: (a.size, float(a.min()), float(a.max()))
  used = sorted(fingerprint(v) for v in traverse_util.flatten_dict(converted).values())
  given = sorted(fingerprint(v) for k, v in official.items()
                 if not k.endswith("num_batches_tracked"))
  assert used == given


def reference_conv(x, kernel_oihw, dilation=1):
  """Stride-1 conv padded by dilation * (k // 2): x [H, W, I] float64, PyTorch kernel
  [O, I, k, k] -> [H, W, O]."""
  size = kernel_oihw.shape[-1]
  pad = dilation * (size // 2)
  x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[0] - 2 * pad, x.shape[1] - 2 * pad
  out = 0
  for i in range(size):
    for j in range(size):
      tap = x[i * dilation:i * dilation + h, j * dilation:j * dilation + w]
      out = out + tap @ kernel_oihw[:, :, i, j].T
  return out


def _bilinear_half_pixel(x, size):
  """PyTorch bilinear, align_corners=False: x [h, w, C] -> [size[0], size[1], C]."""
  for axis, n in enumerate(size):
    m = x.shape[axis]
    src = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, m - 1)
    frac = (src - low).reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
    x = np.take(x, low, axis) * (1 - frac) + np.take(x, high, axis) * frac
  return x


def _official_heads(sd, c5, c2):
  """The doc's RSEPM forward of the heads in eval mode (NumPy, float64): cams, seg_logits."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

  def conv_bn_relu(module, x, dilation=1):
    x = reference_conv(x, sd[f"{module}.conv.weight"], dilation)
    scale = sd[f"{module}.bn.weight"] / np.sqrt(sd[f"{module}.bn.running_var"] + 1e-5)
    return np.maximum((x - sd[f"{module}.bn.running_mean"]) * scale + sd[f"{module}.bn.bias"], 0)

  cams = reference_conv(c5, sd["classifier.weight"])
  branches = [conv_bn_relu("aspp.aspp1", c5)]
  branches += [conv_bn_relu(f"aspp.aspp{i}", c5, d) for i, d in ((2, 6), (3, 12), (4, 18))]
  pooled = conv_bn_relu("aspp.global_avg_pool.1", c5.mean(axis=(0, 1), keepdims=True))
  branches.append(np.broadcast_to(pooled, c5.shape[:2] + (256,)))
  aspp = conv_bn_relu("aspp.block.0", np.concatenate(branches, -1))
  x = np.concatenate([_bilinear_half_pixel(aspp, c2.shape[:2]),
                      conv_bn_relu("decoder.low_block", c2)], -1)
  x = conv_bn_relu("decoder.classifier.2", conv_bn_relu("decoder.classifier.0", x))
  return cams, reference_conv(x, sd["decoder.classifier.4.weight"])


def test_converted_heads_match_the_official_forward(official, converted):
  rng = np.random.default_rng(1)
  c5 = np.maximum(rng.normal(size=(7, 7, 2048)), 0)  # big enough for the 6/12/18 dilations
  c2 = np.maximum(rng.normal(size=(14, 14, 256)), 0)
  model = state.build_model(rsepm_config())
  features = {"C5": jnp.asarray(c5[None], jnp.float32), "C2": jnp.asarray(c2[None], jnp.float32)}
  outputs = jax.jit(lambda v, f: model.apply(v, None, features=f))(converted, features)
  cams, seg_logits = _official_heads(official, c5, c2)
  for ours, reference in ((outputs["cams"][0], cams), (outputs["seg_logits"][0], seg_logits)):
    assert ours.shape == reference.shape
    error = np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max()
    assert error < 1e-4, error


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("aspp.aspp2.bn.running_var"),
     r"1 missing keys: \['aspp.aspp2.bn.running_var'\]"),
    (lambda sd: sd.update({"decoder.extra.weight": np.zeros(3)}),
     r"1 unexpected keys: \['decoder.extra.weight'\]"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("aspp.")],
     r"30 missing keys: \['aspp.aspp1.bn.bias', .*\] and 20 more\)"),
    (lambda sd: sd.update({"classifier.weight": np.zeros((21, 2048, 1, 1))}),
     r"1 shape mismatches: \['classifier.weight: checkpoint \(21, 2048, 1, 1\), model "
     r"\(20, 2048, 1, 1\)'\]"),
])
def test_key_and_shape_errors_name_them(official, edit, message):
  broken = dict(official)
  edit(broken)
  with pytest.raises(convert.WeightsError,
                     match="ckpt.pth does not fit the configured RS\\+EPM model") as e:
    convert.from_official(broken, rsepm_config(), "ckpt.pth")
  assert e.match(message)


def test_shape_errors_name_the_checkpoint_sizes(official):
  with pytest.raises(convert.WeightsError,
                     match=r"low_level_channels and config.model.with_decoder against "
                     r"the checkpoint \(it has data.num_classes=20, model.decoder_channels=256, "
                     r"model.low_level_channels=256\)\.$"):
    convert.from_official(official, rsepm_config(decoder_channels=16, low_level_channels=16))


def test_num_batches_tracked_is_optional(official, converted):
  trimmed = {k: v for k, v in official.items() if not k.endswith("num_batches_tracked")}
  again = convert.from_official(trimmed, rsepm_config())
  jax.tree.map(np.testing.assert_array_equal, again, converted)


def test_depth_mismatch_is_named(official):
  with pytest.raises(convert.WeightsError, match="looks like a ResNet-50 checkpoint"):
    convert.from_official(official, rsepm_config(backbone="resnet101"))


@pytest.fixture(scope="module")
def official_file(official, tmp_path_factory):
  path = tmp_path_factory.mktemp("official") / "rsepm_r50.safetensors"
  path.write_bytes(safetensors.numpy.save(official))
  return path


def test_init_from_loads_the_whole_model(official_file, converted):
  """`load_into` (config.model.init_from) replaces every variable, not only the backbone."""
  config = rsepm_config()
  template = jax.eval_shape(state.build_model(config).init, jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)))
  loaded = convert.load_into(template, official_file, 50)
  jax.tree.map(np.testing.assert_array_equal, loaded, converted)
  jax.tree.map(np.testing.assert_array_equal,
               convert.load_official(official_file, config), converted)


def test_cli_copies_an_official_checkpoint(official_file, converted, tmp_path, capsys):
  """`python -m rsepm_jax.models.convert rsepm_r50.pth rsepm_r50.npz` keeps the official keys."""
  dst = tmp_path / "rsepm_r50.npz"
  convert.convert_file(official_file, dst)
  # 374 tensors less the num_batches_tracked of 53 backbone and 9 head BNs.
  assert "Wrote the 312 tensors of an official RS+EPM checkpoint" in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, convert.load_official(dst, rsepm_config()), converted)


def test_inference_without_a_checkpoint_uses_init_from(official_file, converted, tmp_path):
  """--mode=eval / export: an empty workdir and an official init_from give its weights, step 0;
  an ImageNet backbone alone is refused."""
  config = rsepm_config(init_from=str(official_file))
  config.data.root = str(tmp_path)  # not read: no data is needed to restore
  mesh = parallel.make_mesh()
  model, variables, step = train.restore_for_inference(config, str(tmp_path / "run"), mesh)
  assert step == 0 and model.backbone == "resnet50"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), variables, converted)
  backbone_only = tmp_path / "resnet50.safetensors"
  backbone_only.write_bytes(safetensors.numpy.save(
      {k[len("model."):]: v for k, v in convert.load_state_dict(official_file).items()
       if k.startswith("model.")}))
  config.model.init_from = str(backbone_only)
  with pytest.raises(convert.WeightsError, match="holds no official RS\\+EPM heads"):
    train.restore_for_inference(config, str(tmp_path / "run"), mesh)


def test_command_line_names_a_checkpoint_that_does_not_fit(tmp_path):
  """--mode=eval with a checkpoint of another model: one error line naming the file, no
  traceback (the file is read before anything compiles)."""
  path = tmp_path / "rsepm.safetensors"
  path.write_bytes(safetensors.numpy.save({"classifier.weight": np.zeros((20, 2048, 1, 1),
                                                                        np.float32)}))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "rsepm_jax.main", "--config=configs/demo.py:smoke", "--mode=eval",
       f"--workdir={tmp_path / 'run'}", "--config.model.backbone=resnet50",
       f"--config.model.init_from={path}"],
      capture_output=True, text=True, timeout=300, env=env, cwd=root)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"WeightsError: {path} does not fit the configured RS+EPM model (")
