"""The boundary network of the multi-stage pipeline (`models/affinity.py`; spec 9, components
spec D.2) and its official state-dict layout (`convert.from_official_affinity`).

The references are NumPy compositions of the official forward (conv, GroupNorm(4, eps 1e-3),
bilinear upsampling, ReLU, concat, conv) and of `get_edge` (pad, flip, crop, average). The fake
official checkpoint uses the key names read off the official module tree (reconstructed, no
released file), random values. ResNet-50 is only traced, never initialised.
"""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rsepm_jax.models import affinity
from rsepm_jax.models import convert
from tests import test_official_checkpoints as official_test

GN_EPS = 1e-3
# Official AffinityNet edge layers: fc_edge{i}.0 conv input channels on C1..C5 (ResNet-50).
R50_EDGE_INPUTS = (64, 256, 512, 1024, 2048)


@pytest.fixture(scope="module")
def tiny():
  """A tiny-backbone AffinityNet, variables whose edge-layer parameters are not the initial ones
  (GN scale 1, biases 0 would hide a misplaced one) and the jitted `model.apply`."""
  model = affinity.AffinityNet(backbone="tiny")
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  params = {
      name: tree if name == "backbone" else jax.tree.map(
          lambda x: x + rng.uniform(-0.5, 0.5, x.shape).astype(np.float32), tree)
      for name, tree in variables["params"].items()}
  variables = {"params": params, "batch_stats": variables["batch_stats"]}
  return model, variables, jax.jit(model.apply, static_argnames=("train", "mutable"))


def numpy_group_norm(x, scale, bias, groups=4, eps=GN_EPS):
  """PyTorch GroupNorm of x [B, H, W, C] (float64): statistics over H, W and each group."""
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def upsample_x2_rows(x):
  """Half-pixel bilinear x2 along axis 0 by hand: out[2i] = in[i-1]/4 + 3in[i]/4,
  out[2i+1] = 3in[i]/4 + in[i+1]/4, indices clamped."""
  before = np.concatenate([x[:1], x[:-1]])
  after = np.concatenate([x[1:], x[-1:]])
  out = np.empty((2 * x.shape[0],) + x.shape[1:])
  out[0::2] = 0.25 * before + 0.75 * x
  out[1::2] = 0.75 * x + 0.25 * after
  return out


def numpy_head(params, features):
  """The official edge head (NumPy, float64) on features {"C1".."C5"} [B, h, w, C] with our
  params: branch i = relu(up_i(GN(conv1x1(C_i)))), up = 1, 1, 2, 4, 4, cropped to C2, concat,
  1x1 conv + bias -> [B, h2, w2, 1]."""
  h, w = features["C2"].shape[1:3]
  branches = []
  for i, factor in zip(range(1, 6), (1, 1, 2, 4, 4)):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params[f"edge_{i}"])
    x = np.asarray(features[f"C{i}"], np.float64) @ p["conv"]["kernel"][0, 0]
    x = numpy_group_norm(x, p["norm"]["scale"], p["norm"]["bias"])
    x = np.stack([official_test._bilinear_half_pixel(
        image, (factor * x.shape[1], factor * x.shape[2])) for image in x])
    branches.append(np.maximum(x, 0)[:, :h, :w])
  head = jax.tree.map(lambda a: np.asarray(a, np.float64), params["edge_logit"])
  return np.concatenate(branches, axis=-1) @ head["kernel"][0, 0] + head["bias"]


def test_outputs_are_at_stride_four(tiny):
  _, variables, apply = tiny
  outputs = apply(variables, jnp.zeros((2, 37, 45, 3)))
  assert outputs["edge_logits"].shape == (2, 10, 12, 1)
  assert outputs["edge_logits"].dtype == jnp.float32
  assert outputs["features"]["C2"].shape[1:3] == (10, 12)
  # ResNet-50 at the official 512 crop (traced only): 128 x 128 cells, C1 has 64 channels.
  r50 = affinity.AffinityNet(backbone="resnet50")
  images = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
  abstract = jax.eval_shape(r50.init, jax.random.key(0), images)
  assert jax.eval_shape(r50.apply, abstract, images)["edge_logits"].shape == (1, 128, 128, 1)
  for i, channels in enumerate(R50_EDGE_INPUTS, 1):
    assert abstract["params"][f"edge_{i}"]["conv"]["kernel"].shape == (1, 1, channels, 32)
  assert abstract["params"]["edge_logit"]["kernel"].shape == (1, 1, 160, 1)


def test_head_matches_a_numpy_composition(tiny):
  _, variables, apply = tiny
  images = np.random.default_rng(1).normal(size=(2, 37, 45, 3)).astype(np.float32)
  outputs = apply(variables, images)
  expected = numpy_head(variables["params"], outputs["features"])
  np.testing.assert_allclose(outputs["edge_logits"], expected, rtol=1e-4, atol=1e-4)


def test_edge_branch_group_norm_eps_and_order():
  """One branch with x2 upsampling on a low-variance input, where eps 1e-3 and 1e-5 differ:
  conv -> GroupNorm(4, eps 1e-3) -> upsample -> ReLU."""
  rng = np.random.default_rng(2)
  x = (0.02 * rng.normal(size=(2, 5, 6, 8))).astype(np.float32)
  branch = affinity.EdgeBranch(features=32, upsample=2)
  variables = branch.init(jax.random.key(0), x)
  params = {"conv": {"kernel": rng.normal(size=(1, 1, 8, 32)).astype(np.float32)},
            "norm": {"scale": rng.uniform(0.5, 1.5, 32).astype(np.float32),
                     "bias": rng.normal(0, 0.5, 32).astype(np.float32)}}
  assert jax.tree.map(np.shape, variables["params"]) == jax.tree.map(np.shape, params)
  got = np.asarray(branch.apply({"params": params}, x))

  def reference(eps):
    y = numpy_group_norm(np.asarray(x, np.float64) @ params["conv"]["kernel"][0, 0],
                         params["norm"]["scale"], params["norm"]["bias"], eps=eps)
    y = np.stack([upsample_x2_rows(upsample_x2_rows(image).transpose(1, 0, 2)).transpose(1, 0, 2)
                  for image in y])
    return np.maximum(y, 0)

  np.testing.assert_allclose(got, reference(1e-3), rtol=1e-4, atol=1e-4)
  assert np.abs(got - reference(1e-5)).max() > 1e-2


def test_only_the_edge_layers_learn(tiny):
  _, variables, apply = tiny
  images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  weights = np.random.default_rng(4).normal(size=(2, 8, 8, 1)).astype(np.float32)
  loss = lambda params: jnp.sum(apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, images)["edge_logits"] * weights)
  grads = jax.jit(jax.grad(loss))(variables["params"])
  for path, grad in traverse_util.flatten_dict(grads, sep="/").items():
    if path.startswith("backbone/"):
      assert not np.any(grad), path
    else:
      assert np.any(grad), path
  labels = traverse_util.flatten_dict(affinity.param_labels(variables["params"]), sep="/")
  assert {label for path, label in labels.items() if path.startswith("backbone/")} == {"frozen"}
  assert {label for path, label in labels.items() if not path.startswith("backbone/")} == {"edge"}
  # A backbone gradient (as if it were not detached) still gives no backbone update.
  ones = jax.tree.map(jnp.ones_like, variables["params"])
  tx = affinity.freeze_backbone(optax.sgd(0.1))
  updates, _ = tx.update(ones, tx.init(variables["params"]), variables["params"])
  for path, update in traverse_util.flatten_dict(updates, sep="/").items():
    np.testing.assert_array_equal(update, 0.0 if path.startswith("backbone/") else np.float32(-0.1),
                                  path)


def test_train_mode_keeps_the_bn_statistics(tiny):
  _, variables, apply = tiny
  images = np.random.default_rng(5).normal(3.0, 2.0, size=(2, 32, 32, 3)).astype(np.float32)
  trained, new_state = apply(variables, images, train=True, mutable="batch_stats")
  for old, new in zip(jax.tree.leaves(variables["batch_stats"]),
                      jax.tree.leaves(new_state["batch_stats"])):
    np.testing.assert_array_equal(old, new)
  np.testing.assert_array_equal(trained["edge_logits"],
                                apply(variables, images)["edge_logits"])


def test_get_edge_matches_a_numpy_composition(tiny):
  """Official get_edge: the image and its flip normalised, zero-padded right and bottom to the
  pad size, logits cropped to ceil(H / 4) x ceil(W / 4), the flip's un-flipped, averaged,
  sigmoid."""
  model, variables, apply = tiny
  images = np.random.default_rng(6).integers(0, 256, size=(2, 37, 45, 3), dtype=np.uint8)
  mean = np.array([0.485, 0.456, 0.406]) * 255
  std = np.array([0.229, 0.224, 0.225]) * 255

  def logits(view, size):  # one view [H, W, 3] -> cropped logits [10, 12]
    padded = np.zeros((size, size, 3), np.float32)
    padded[:37, :45] = (view - mean) / std
    return np.asarray(apply(variables, padded[None])["edge_logits"])[0, :10, :12, 0]

  for size, image_size in ((48, 48), (48, 32)):  # a pad size under 45 pads to 48 (x16)
    for image, got in zip(images, affinity.edge_maps(model, variables, images, image_size)):
      average = (logits(image, size) + logits(image[:, ::-1], size)[:, ::-1]) / 2
      np.testing.assert_allclose(got, 1 / (1 + np.exp(-average)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(affinity.get_edge(model, variables, images[1], 48),
                             affinity.edge_maps(model, variables, images, 48)[1], atol=1e-6)
  assert affinity.padded_size(500, 375) == (512, 512)
  assert affinity.padded_size(640, 513) == (640, 528)


def official_affinity_state_dict(seed=0):
  """Random tensors under the reconstructed official AffinityNet keys (ResNet-50, feature 32):
  the backbone under `model.`, fc_edge1..6, their `edge_layers` copies, a path-index buffer."""
  state_dict = official_test.FakeStateDict(seed)
  state_dict.torchvision_resnet(50)
  for i, channels in enumerate(R50_EDGE_INPUTS, 1):
    state_dict.conv(f"fc_edge{i}.0.weight", (32, channels, 1, 1))
    state_dict[f"fc_edge{i}.1.weight"] = state_dict.rng.uniform(0.5, 1.5, 32).astype(np.float32)
    state_dict[f"fc_edge{i}.1.bias"] = state_dict.rng.normal(0, 0.1, 32).astype(np.float32)
  state_dict.conv("fc_edge6.weight", (1, 160, 1, 1))
  state_dict["fc_edge6.bias"] = np.array([0.3], np.float32)
  for key in [k for k in state_dict if k.startswith("fc_edge")]:
    number, rest = key[len("fc_edge"):].split(".", 1)
    state_dict[f"edge_layers.{int(number) - 1}.{rest}"] = state_dict[key].copy()
  state_dict["path_indices_0"] = np.arange(12, dtype=np.int64).reshape(1, 3, 4)
  return dict(state_dict)


@pytest.fixture(scope="module")
def official():
  return official_affinity_state_dict()


def test_official_affinity_checkpoint_places_every_tensor_once(official):
  converted = convert.from_official_affinity(official)
  params = converted["params"]
  hwio = lambda key: official[key].transpose(2, 3, 1, 0)
  for i in range(1, 6):
    np.testing.assert_array_equal(params[f"edge_{i}"]["conv"]["kernel"],
                                  hwio(f"fc_edge{i}.0.weight"))
    norm = params[f"edge_{i}"]["norm"]
    np.testing.assert_array_equal(norm["scale"], official[f"fc_edge{i}.1.weight"])
    np.testing.assert_array_equal(norm["bias"], official[f"fc_edge{i}.1.bias"])
  np.testing.assert_array_equal(params["edge_logit"]["kernel"], hwio("fc_edge6.weight"))
  np.testing.assert_array_equal(params["edge_logit"]["bias"], official["fc_edge6.bias"])
  np.testing.assert_array_equal(params["backbone"]["layer3_5"]["conv2"]["kernel"],
                                hwio("model.layer3.5.conv2.weight"))
  np.testing.assert_array_equal(converted["batch_stats"]["backbone"]["bn1"]["var"],
                                official["model.bn1.running_var"])
  # Fingerprints that survive a transpose: each weight once (not its `edge_layers` copy).
  fingerprint = lambda a: (a.size, float(a.min()), float(a.max()))
  used = sorted(fingerprint(v) for v in traverse_util.flatten_dict(converted).values())
  given = sorted(fingerprint(v) for k, v in official.items()
                 if k.startswith(("model.", "fc_edge")) and not k.endswith("num_batches_tracked"))
  assert used == given
  assert convert.official_arch(official) == "affinity"


def test_official_affinity_checkpoint_errors_name_the_keys(official):
  broken = dict(official)
  del broken["fc_edge3.1.bias"], broken["edge_layers.2.1.bias"]
  broken["fc_edge7.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(convert.WeightsError,
                     match=r"AffinityNet.*missing keys: \['fc_edge3\.1\.bias'\].*"
                           r"unexpected keys: \['fc_edge7\.weight'\]"):
    convert.from_official_affinity(broken, where="affinity.pth")
  differing = dict(official)
  differing["edge_layers.5.bias"] = differing["fc_edge6.bias"] + 1
  with pytest.raises(convert.WeightsError, match="edge_layers.5.bias differs from fc_edge6.bias"):
    convert.from_official_affinity(differing)
  with pytest.raises(convert.WeightsError, match="looks like an official AffinityNet checkpoint"):
    convert.from_official(official, official_test.rsepm_config())
