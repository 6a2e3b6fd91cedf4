"""The multi-stage networks DeepLabv3+ / DeepLabv2 (`models/deeplab.py`), their official
checkpoints (`convert.from_official`) and the modes that run them (`config_check.check_mode`).

The fake checkpoints follow docs `official_checkpoints.md`: the torchvision ResNet-101 under
`model.` and the head keys and shapes listed there for "DeepLabv3_Plus" and "DeepLabv2" (20
classes), random values. Big models are only traced (`jax.eval_shape`), never initialised.
"""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from rsepm_jax import config_check
from rsepm_jax import parallel
from rsepm_jax import state
from rsepm_jax import train
from rsepm_jax.configs import demo
from rsepm_jax.configs import voc
from rsepm_jax.models import convert
from rsepm_jax.models import deeplab
from tests import test_official_checkpoints as official_test

# DeepLabv3_Plus heads (doc): conv + BN module -> (output channels, input channels, kernel size).
V3PLUS_CONV_BN = {
    "aspp.aspp1": (256, 2048, 1),
    "aspp.aspp2": (256, 2048, 3),
    "aspp.aspp3": (256, 2048, 3),
    "aspp.aspp4": (256, 2048, 3),
    "aspp.global_avg_pool.1": (256, 2048, 1),
    "aspp.block.0": (256, 1280, 1),
    "decoder.low_block": (48, 256, 1),
    "decoder.classifier.0": (256, 304, 3),
    "decoder.classifier.2": (256, 256, 3),
}


def v3plus_state_dict(depth=101, seed=0):
  """Official DeepLabv3_Plus keys and shapes, 21 outputs (doc), random values."""
  state_dict = official_test.FakeStateDict(seed)
  state_dict.torchvision_resnet(depth)
  for module, (out_channels, in_channels, size) in V3PLUS_CONV_BN.items():
    state_dict.conv(f"{module}.conv.weight", (out_channels, in_channels, size, size))
    state_dict.bn(f"{module}.bn", out_channels)
  state_dict.conv("decoder.classifier.4.weight", (21, 256, 3, 3))
  return dict(state_dict)


def v2_state_dict(depth=101, seed=0):
  """Official DeepLabv2 keys and shapes, 21 outputs (doc), random values."""
  state_dict = official_test.FakeStateDict(seed)
  state_dict.torchvision_resnet(depth)
  for i in range(1, 5):
    state_dict.conv(f"aspp.aspp{i}.weight", (21, 2048, 3, 3))
    state_dict[f"aspp.aspp{i}.bias"] = state_dict.rng.normal(0, 0.1, 21).astype(np.float32)
  return dict(state_dict)


def stage2_config(arch, **model):
  """configs/voc.py (20 classes, ASPP / decoder 256) as the official stage-2 model: `arch`,
  ResNet-101, output stride 8, low-level 48; `model` overrides."""
  config = voc.get_config()
  config.data.crop_size = 64
  config.model.update(arch=arch, backbone="resnet101", output_stride=8, low_level_channels=48,
                      dtype="float32")
  config.model.update(model)
  return config


@pytest.fixture(scope="module")
def v3plus():
  return v3plus_state_dict()


@pytest.fixture(scope="module")
def v2():
  return v2_state_dict()


def test_fake_checkpoints_have_the_documented_totals(v3plus, v2):
  # official_checkpoints.md: 624 tensors under `model.` for ResNet-101; DeepLabv3+ R101 679
  # (59.5 M values), DeepLabv2 R101 632 (44.2 M), num_batches_tracked included.
  for state_dict, tensors, millions in ((v3plus, 679, 59.5), (v2, 632, 44.2)):
    assert sum(key.startswith("model.") for key in state_dict) == 624
    assert len(state_dict) == tensors
    assert round(sum(v.size for v in state_dict.values()) / 1e6, 1) == millions


@pytest.mark.parametrize("arch, fixture, samples", [
    ("deeplabv3plus", "v3plus", {
        "decoder.low_block.conv.weight": ("params", "decoder/low_level/conv/kernel"),
        "decoder.classifier.0.bn.running_var": ("batch_stats", "decoder/conv1/bn/var"),
        "aspp.aspp4.conv.weight": ("params", "aspp/branch_3x3_2/conv/kernel"),
        "decoder.classifier.4.weight": ("params", "decoder/classifier/kernel"),
        "model.layer3.22.conv2.weight": ("params", "backbone/layer3_22/conv2/kernel")}),
    ("deeplabv2", "v2", {
        "aspp.aspp1.weight": ("params", "aspp/branch_0/kernel"),
        "aspp.aspp3.bias": ("params", "aspp/branch_2/bias"),
        "aspp.aspp4.weight": ("params", "aspp/branch_3/kernel"),
        "model.layer4.2.bn3.running_mean": ("batch_stats", "backbone/layer4_2/bn3/mean")}),
])
def test_resnet101_checkpoints_load_into_their_network(arch, fixture, samples, request):
  """Every official tensor (num_batches_tracked aside) lands once in the network's variables,
  which have the traced network's structure; samples by name, conv kernels OIHW -> HWIO."""
  official = request.getfixturevalue(fixture)
  config = stage2_config(arch)
  converted = convert.from_official(official, config)
  abstract = jax.eval_shape(state.build_model(config).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  flat = traverse_util.flatten_dict(converted, sep="/")
  assert {k: v.shape for k, v in flat.items()} == {
      k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  assert all(v.dtype == np.float32 for v in flat.values())
  for key, (collection, path) in samples.items():
    expected = official[key]
    if expected.ndim == 4:
      expected = expected.transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(flat[f"{collection}/{path}"], expected, err_msg=key)
  fingerprint = lambda a: (a.size, float(a.min()), float(a.max()))
  assert sorted(fingerprint(v) for v in flat.values()) == sorted(
      fingerprint(v) for k, v in official.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("fixture, arch, edit, message", [
    ("v2", "deeplabv2", lambda sd: sd.pop("aspp.aspp4.bias"),
     r"does not fit the configured DeepLabv2 model \(1 missing keys: \['aspp.aspp4.bias'\]\)"),
    ("v2", "deeplabv2", lambda sd: sd.update({"aspp.aspp5.weight": np.zeros((21, 2048, 3, 3))}),
     r"\(1 unexpected keys: \['aspp.aspp5.weight'\]\)\. Check config.model.backbone and "
     r"config.data.num_classes against the checkpoint \(it has data.num_classes=20\)\.$"),
    ("v3plus", "deeplabv3plus", lambda sd: sd.pop("decoder.low_block.bn.running_mean"),
     r"DeepLabv3\+ model \(1 missing keys: \['decoder.low_block.bn.running_mean'\]\)"),
    ("v3plus", "deeplabv3plus", lambda sd: sd.update({"decoder.extra.weight": np.zeros(3)}),
     r"DeepLabv3\+ model \(1 unexpected keys: \['decoder.extra.weight'\]\)"),
])
def test_missing_and_unexpected_keys_are_named(fixture, arch, edit, message, request):
  broken = dict(request.getfixturevalue(fixture))
  edit(broken)
  with pytest.raises(convert.WeightsError, match=r"^ckpt\.pth does not fit") as error:
    convert.from_official(broken, stage2_config(arch), "ckpt.pth")
  assert error.match(message)


def test_shape_mismatches_name_the_checkpoint_sizes(v3plus):
  """The official low-level block has 48 channels: RS+EPM's 256 does not fit."""
  with pytest.raises(convert.WeightsError) as error:
    convert.from_official(v3plus, stage2_config("deeplabv3plus", low_level_channels=256))
  # The low-level conv and its BN (5 tensors) and the first decoder conv, 256 + 48 inputs.
  assert error.match(r"\(6 shape mismatches: \['decoder.classifier.0.conv.weight: checkpoint "
                     r"\(256, 304, 3, 3\), model \(256, 512, 3, 3\)', 'decoder.low_block.bn.bias")
  assert error.match(r"'decoder.low_block.conv.weight: checkpoint \(48, 256, 1, 1\), model "
                     r"\(256, 256, 1, 1\)'\]\)")
  assert error.match(r"\(it has data.num_classes=20, model.decoder_channels=256, "
                     r"model.low_level_channels=48\)\.$")


@pytest.mark.parametrize("given, arch, found", [
    ("v2", "deeplabv3plus", "an official DeepLabv2 checkpoint \\(config.model.arch='deeplabv3plus'"
     "\\); set --config.model.arch=deeplabv2"),
    ("v3plus", "deeplabv2", "an official DeepLabv3\\+ checkpoint \\(config.model.arch='deeplabv2'"
     "\\); set --config.model.arch=deeplabv3plus"),
    ("v3plus", "rsepm", "an official DeepLabv3\\+ checkpoint"),
    ("rsepm", "deeplabv2", "an official RS\\+EPM checkpoint \\(config.model.arch='deeplabv2'\\); "
     "set --config.model.arch=rsepm"),
])
def test_a_checkpoint_of_another_network_is_named(given, arch, found, request):
  official = request.getfixturevalue(given.replace("rsepm", "v3plus"))
  if given == "rsepm":  # RS+EPM's CAM classifier marks its checkpoints
    official = {**official, "classifier.weight": np.zeros((20, 2048, 1, 1), np.float32)}
  with pytest.raises(convert.WeightsError, match=f"^x.pth: this looks like {found}"):
    convert.from_official(official, stage2_config(arch), "x.pth")


def test_deeplabv2_head_matches_explicit_dilated_convs():
  """Sum over d in (6, 12, 18, 24) of a 3x3 conv with dilation d, zero padding d, plus bias;
  the 13x13 map lets the 6 and 12 taps land inside."""
  rng = np.random.default_rng(0)
  c5 = rng.normal(size=(13, 13, 16))
  head = deeplab.DeepLabV2Head(num_classes=3)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                        head.init(jax.random.key(0), jnp.zeros((1, 13, 13, 16)))["params"])
  ours = head.apply({"params": params}, jnp.asarray(c5[None], jnp.float32))[0]
  expected = _v2_head_reference(c5, params)
  assert ours.shape == (13, 13, 4)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _v2_head_reference(c5, params):
  """NumPy DeepLabv2 head, float64: c5 [h, w, C], params of `DeepLabV2Head` -> [h, w, K]."""
  h, w, _ = c5.shape
  out = 0
  for i, d in enumerate((6, 12, 18, 24)):
    kernel = np.asarray(params[f"branch_{i}"]["kernel"], np.float64)  # HWIO
    padded = np.pad(c5, ((d, d), (d, d), (0, 0)))
    branch = np.zeros((h, w, kernel.shape[-1]))
    for y in range(h):
      for x in range(w):
        for ky in range(3):
          for kx in range(3):
            branch[y, x] += padded[y + ky * d, x + kx * d] @ kernel[ky, kx]
    out = out + branch + np.asarray(params[f"branch_{i}"]["bias"], np.float64)
  return out


def random_variables(abstract, rng):
  """Random float32 variables shaped like `abstract`: He-scaled kernels, BN scales and variances
  in [0.5, 1.5], other leaves N(0, 0.1) (no init to compile)."""
  def leaf(path, value):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(value.shape[:-1])), value.shape)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, value.shape)
    return rng.normal(0, 0.1, value.shape)

  return jax.tree_util.tree_map_with_path(
      lambda path, value: jnp.asarray(leaf(path, value), jnp.float32), abstract)


def test_tiny_deeplabv2_runs_its_head_on_c5():
  """The network's logits are the head on its own C5, at stride 8 (60 px -> 8x8)."""
  config = stage2_config("deeplabv2", backbone="tiny", backbone_width=4)
  config.data.num_classes = 3
  model = state.build_model(config)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(1, 60, 60, 3)), jnp.float32)
  variables = random_variables(jax.eval_shape(model.init, jax.random.key(0), images), rng)
  outputs = jax.jit(model.apply)(variables, images)
  assert sorted(outputs["features"]) == ["C1", "C2", "C3", "C4", "C5"]
  assert outputs["seg_logits"].shape == (1, 8, 8, 4)
  assert outputs["seg_logits"].dtype == jnp.float32
  expected = _v2_head_reference(np.asarray(outputs["features"]["C5"][0], np.float64),
                                variables["params"]["aspp"])
  np.testing.assert_allclose(outputs["seg_logits"][0], expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("output_stride, dtype", [(16, "float32"), (8, "bfloat16")])
def test_deeplabv3plus_outputs_at_stride_4(output_stride, dtype):
  """60 px -> 15x15 logits (ceil(60 / 4)) with C + 1 channels, float32; a 48-channel low-level
  block, so the decoder's first conv sees decoder_channels + 48."""
  config = stage2_config("deeplabv3plus", backbone="tiny", output_stride=output_stride,
                         decoder_channels=16, dtype=dtype)
  config.data.num_classes = 3
  model = state.build_model(config)
  images = jax.ShapeDtypeStruct((2, 60, 60, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  outputs = jax.eval_shape(model.apply, variables, images)
  assert set(outputs) == {"seg_logits", "features"}
  assert outputs["seg_logits"].shape == (2, 15, 15, 4)
  assert outputs["seg_logits"].dtype == jnp.float32
  c2_channels = outputs["features"]["C2"].shape[-1]
  decoder = variables["params"]["decoder"]
  assert decoder["low_level"]["conv"]["kernel"].shape == (1, 1, c2_channels, 48)
  assert decoder["conv1"]["conv"]["kernel"].shape == (3, 3, 16 + 48, 16)
  assert "classifier" not in variables["params"]  # no CAM head


def test_restore_for_inference_loads_an_official_deeplabv2(tmp_path):
  """--mode=eval / export without a workdir checkpoint: the init_from file's whole DeepLabv2."""
  official = v2_state_dict(depth=50)
  path = tmp_path / "deeplabv2_r50.safetensors"
  path.write_bytes(safetensors.numpy.save(official))
  config = stage2_config("deeplabv2", backbone="resnet50", init_from=str(path))
  config.data.root = str(tmp_path)  # not read
  model, variables, step = train.restore_for_inference(
      config, str(tmp_path / "run"), parallel.make_mesh())
  assert step == 0 and isinstance(model, deeplab.DeepLabV2)
  kernel = np.asarray(variables["params"]["aspp"]["branch_1"]["kernel"])
  np.testing.assert_array_equal(kernel, official["aspp.aspp2.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv2"])
def test_modes_of_the_stage2_networks(arch, tmp_path):
  config = demo.get_config()
  config.model.arch = arch
  with pytest.raises(config_check.ConfigError, match=r"needs --config.export.protocol=paper"):
    config_check.check_mode(config, "export")
  config.eval.protocol = config.export.protocol = "paper"
  config_check.check_mode(config, "eval")
  config_check.check_mode(config, "export")
  config.model.arch = "rsepm"
  config.eval.protocol = config.export.protocol = "single"
  for mode in ("train", "eval", "export"):
    config_check.check_mode(config, mode)
  config.model.arch = "affinity"  # the random walk's boundary network only trains
  config_check.check_mode(config, "train")
  for mode in ("eval", "export", "predict"):
    with pytest.raises(config_check.ConfigError, match=f"--mode={mode} of config.model.arch="
                       "'affinity': the random walk's boundary network segments nothing"):
      config_check.check_mode(config, mode)


def test_unknown_arch_is_refused():
  config = demo.get_config()
  config.model.arch = "deeplabv4"
  with pytest.raises(config_check.ConfigError,
                     match=r"config.model.arch='deeplabv4': expected one of \('rsepm', "
                     r"'deeplabv3plus', 'deeplabv2', 'affinity'\)"):
    config_check.validate(config)
