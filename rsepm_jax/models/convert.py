"""ImageNet ResNet weights from torchvision / timm checkpoints into `resnet.ResNet` (spec 1.1).

RS+EPM starts from torchvision's `resnet50-19c8e357.pth` / `resnet101-5d3b4d8f.pth`, loaded
with `strict=False` so that `fc` is dropped. Here missing keys and shape mismatches are errors
and unexpected keys (`fc.*`) are reported.

Command line (writes an `.npz` of flattened variables, "params/layer1_0/conv1/kernel"):

  python -m rsepm_jax.models.convert resnet50.safetensors resnet50.npz --depth 50
"""
import functools
import io

from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from rsepm_jax.models import resnet


# (collection, Flax leaf) -> torchvision leaf.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_MODULE_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_KEY_PREFIXES = ("module.", "model.")  # DataParallel / wrapper prefixes to strip


def torchvision_key(collection, path):
  """Flax variable path -> torchvision key.

  `("params", ("layer1_0", "downsample_bn", "scale"))` -> "layer1.0.downsample.1.weight".
  """
  *modules, leaf = path
  names = [_MODULE_NAMES.get(m, m.replace("_", ".")) for m in modules]
  return ".".join(names + [_LEAF_NAMES[(collection, leaf)]])


def _to_torch_layout(collection, path, shape):
  """Flax shape -> torchvision shape (HWIO conv kernels are OIHW in PyTorch)."""
  if collection == "params" and path[-1] == "kernel":
    return tuple(shape[i] for i in (3, 2, 0, 1))
  return tuple(shape)


@functools.lru_cache(maxsize=None)
def abstract_variables(depth):
  """`resnet(depth)` variables as `jax.ShapeDtypeStruct`s (no computation)."""
  return jax.eval_shape(
      resnet.resnet(depth).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


@functools.lru_cache(maxsize=None)
def expected_torchvision_shapes(depth):
  """{torchvision key: (collection, Flax path, torchvision shape)} of `resnet(depth)`."""
  expected = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in traverse_util.flatten_dict(abstract_variables(depth)[collection]).items():
      key = torchvision_key(collection, path)
      expected[key] = (collection, path, _to_torch_layout(collection, path, leaf.shape))
  return expected


def compare_keys(state_dict, depth):
  """(missing, unexpected) torchvision keys of `state_dict` for `resnet(depth)`, sorted.

  `num_batches_tracked` buffers are neither used nor reported.
  """
  expected = expected_torchvision_shapes(depth)
  given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
  return sorted(set(expected) - given), sorted(given - set(expected))


def from_torchvision(state_dict, depth):
  """torchvision ResNet state dict {key: np.ndarray} -> `resnet(depth)` variables.

  Returns {"params": ..., "batch_stats": ...} of float32 numpy arrays. Missing keys and shape
  mismatches raise ValueError; unexpected keys (e.g. `fc.*`) are logged and dropped.
  """
  missing, unexpected = compare_keys(state_dict, depth)
  if missing:
    raise ValueError(f"ResNet-{depth} state dict lacks {len(missing)} keys: {missing}")
  if any(not k.startswith("fc.") for k in unexpected):
    logging.warning("Dropped %d unexpected keys: %s", len(unexpected), unexpected)
  elif unexpected:
    logging.info("Dropped the ImageNet classifier: %s", unexpected)
  flat = {}
  for key, (collection, path, torch_shape) in expected_torchvision_shapes(depth).items():
    value = np.asarray(state_dict[key], np.float32)
    if value.shape != torch_shape:
      raise ValueError(f"Shape mismatch for {key}: checkpoint has {value.shape}, "
                       f"ResNet-{depth} expects {torch_shape}.")
    if collection == "params" and path[-1] == "kernel":
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    flat[(collection,) + path] = value
  return traverse_util.unflatten_dict(flat)


def _strip_key_prefix(state_dict):
  for prefix in _KEY_PREFIXES:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
      return {k[len(prefix):]: v for k, v in state_dict.items()}
  return state_dict


def _load_torch_checkpoint(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading {path} needs PyTorch, which is not installed: install torch, or convert "
        "the checkpoint to .safetensors (e.g. the timm `resnet50.tv_in1k` files).") from e
  state_dict = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu",
                          weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def load_state_dict(path):
  """Read a weights file into {key: np.ndarray}; `path` may be local or `gs://`.

  `.safetensors` / `.pth` / `.pt`: torchvision or timm ResNet keys, with any `module.` or
  `model.` prefix stripped. `.npz`: flattened variables as written by this module's CLI.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Weights file not found: {path}")
  if path.suffix == ".safetensors":
    return _strip_key_prefix(safetensors.numpy.load(path.read_bytes()))
  if path.suffix in (".pth", ".pt"):
    return _strip_key_prefix(_load_torch_checkpoint(path))
  if path.suffix == ".npz":
    with np.load(io.BytesIO(path.read_bytes())) as arrays:
      return dict(arrays)
  raise ValueError(f"Unsupported weights file {path}: expected .safetensors, .pth, .pt "
                   "or .npz.")


def _check_same_shapes(expected, given, where):
  """Raise ValueError unless the two trees have the same paths and leaf shapes."""
  expected = traverse_util.flatten_dict(expected, sep="/")
  given = traverse_util.flatten_dict(given, sep="/")
  missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
  if missing or extra:
    raise ValueError(f"{where}: missing variables {missing}, unexpected variables {extra}.")
  for name, leaf in expected.items():
    if tuple(given[name].shape) != tuple(leaf.shape):
      raise ValueError(f"Shape mismatch for {where}/{name}: weights have "
                       f"{tuple(given[name].shape)}, the model expects {tuple(leaf.shape)}.")


def load_backbone_variables(path, depth):
  """`resnet(depth)` variables from a torchvision / timm checkpoint or a converted `.npz`."""
  arrays = load_state_dict(path)
  if epath.Path(path).suffix != ".npz":
    return from_torchvision(arrays, depth)
  variables = traverse_util.unflatten_dict(arrays, sep="/")
  _check_same_shapes(abstract_variables(depth), variables, str(path))
  return variables


def load_into(variables, path, depth):
  """Copy of RSEPMNet `variables` with `params/backbone` and `batch_stats/backbone` from `path`.

  The classifier, ASPP and decoder are left as they are. Raises ValueError when the weights do
  not fit the model's backbone (e.g. a depth mismatch).
  """
  backbone = load_backbone_variables(path, depth)
  loaded = {collection: dict(tree) for collection, tree in variables.items()}
  for collection in ("params", "batch_stats"):
    target = variables[collection]["backbone"]
    _check_same_shapes(target, backbone[collection], f"{collection}/backbone")
    loaded[collection]["backbone"] = jax.tree.map(
        lambda new, old: np.asarray(new, old.dtype), backbone[collection], target)
  return loaded


def convert_file(src, dst, depth=50):
  """Converts the torchvision checkpoint `src` to an `.npz` of flattened variables at `dst`."""
  state_dict = load_state_dict(src)
  missing, unexpected = compare_keys(state_dict, depth)
  print(f"Missing keys ({len(missing)}): {missing}")
  print(f"Unexpected keys, dropped ({len(unexpected)}): {unexpected}")
  variables = from_torchvision(state_dict, depth)
  buffer = io.BytesIO()
  np.savez(buffer, **traverse_util.flatten_dict(variables, sep="/"))
  epath.Path(dst).write_bytes(buffer.getvalue())
  print(f"Wrote ResNet-{depth} variables to {dst}")


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("Usage: python -m rsepm_jax.models.convert SRC DST [--depth 50]")
  convert_file(argv[1], argv[2], flags.FLAGS.depth)


if __name__ == "__main__":
  # Defined here, not at import, so importing this module adds no global flag.
  flags.DEFINE_integer("depth", 50, "ResNet depth of the checkpoint: 50 or 101.")
  app.run(main)
