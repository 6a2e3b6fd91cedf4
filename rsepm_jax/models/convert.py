"""ImageNet ResNet weights from torchvision / timm checkpoints into `resnet.ResNet` (spec 1.1),
ImageNet ResNeSt weights from timm / original ResNeSt checkpoints into `resnest.ResNeSt`
(`from_timm_resnest`),
and official RS+EPM checkpoints into the whole network of `config.model.arch` (`from_official`):
the single-stage `RSEPMNet` or the multi-stage DeepLabv3+ / DeepLabv2 (spec 9), and the
multi-stage boundary network `affinity.AffinityNet` (`from_official_affinity`).

RS+EPM starts from torchvision's `resnet50-19c8e357.pth` / `resnet101-5d3b4d8f.pth`, loaded
with `strict=False` so that `fc` is dropped. Here missing keys and shape mismatches are errors
(a ResNet-101 checkpoint for a ResNet-50 is named as such) and unexpected keys (`fc.*`) are
reported. `.pth` files need PyTorch (`pip install .[torch]`); convert them once where it is
installed and use the result anywhere.

Command line (DST `.npz`: flattened variables, "params/layer1_0/conv1/kernel"; DST
`.safetensors`: the torchvision keys without `fc`; an official checkpoint keeps its keys):

  python -m rsepm_jax.models.convert resnet50.pth resnet50.safetensors --depth 50
  python -m rsepm_jax.models.convert rsepm_r50.pth rsepm_r50.safetensors
"""
import functools
import io
import re

from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from rsepm_jax.models import affinity
from rsepm_jax.models import networks
from rsepm_jax.models import resnest
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
_WRAPPER_KEYS = ("state_dict", "model")  # training checkpoints: {"state_dict": {...}, "epoch": ...}
# torchvision depth by (bottleneck blocks, blocks per stage), to name a checkpoint's depth.
_TORCHVISION_DEPTHS = {
    (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
    (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152}
_BLOCK_KEY = re.compile(r"(?:^|[./])layer([1-4])[._](\d+)[./]")
_MAX_LISTED = 10  # keys or variables named in an error


class WeightsError(ValueError):
  """A weights file that cannot be read or does not fit the model; the message names the file
  and the keys (shown without a traceback by `rsepm_jax.main`)."""


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


def _torchvision_layout(variables):
  """{torchvision key: (collection, Flax path, PyTorch shape)} of backbone `variables`."""
  expected = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in traverse_util.flatten_dict(variables[collection]).items():
      key = torchvision_key(collection, path)
      expected[key] = (collection, path, _to_torch_layout(collection, path, leaf.shape))
  return expected


@functools.lru_cache(maxsize=None)
def expected_torchvision_shapes(depth):
  """{torchvision key: (collection, Flax path, torchvision shape)} of `resnet(depth)`."""
  return _torchvision_layout(abstract_variables(depth))


@functools.lru_cache(maxsize=None)
def abstract_resnest_variables(depth):
  """`resnest.resnest(depth)` variables as `jax.ShapeDtypeStruct`s (no computation)."""
  return jax.eval_shape(
      resnest.resnest(depth).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


@functools.lru_cache(maxsize=None)
def expected_resnest_shapes(depth):
  """{timm key: (collection, Flax path, PyTorch shape)} of `resnest.resnest(depth)`."""
  return _torchvision_layout(abstract_resnest_variables(depth))


def _place(state_dict, expected):
  """The tensors of `state_dict` at the Flax paths of `expected` ({key: (collection, path,
  shape)}), float32 numpy; conv kernels OIHW -> HWIO."""
  flat = {}
  for key, (collection, path, _) in expected.items():
    value = np.asarray(state_dict[key], np.float32)
    if collection == "params" and path[-1] == "kernel":
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    flat[(collection,) + path] = value
  return traverse_util.unflatten_dict(flat)


def key_problems(state_dict, expected, ignored_prefix=None):
  """["N missing keys: ...", "N unexpected keys: ...", "N shape mismatches: ..."] (only the
  non-empty ones) of `state_dict` against `expected` {key: (collection, path, torch shape)};
  `num_batches_tracked` and keys starting with `ignored_prefix` are not unexpected."""
  given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
  missing = sorted(set(expected) - given)
  unexpected = sorted(k for k in given - set(expected)
                      if not (ignored_prefix and k.startswith(ignored_prefix)))
  wrong_shape = [f"{key}: checkpoint {tuple(np.shape(state_dict[key]))}, model {shape}"
                 for key, (_, _, shape) in sorted(expected.items())
                 if key in given and tuple(np.shape(state_dict[key])) != shape]
  return [f"{len(names)} {what}: {_listed(names)}"
          for what, names in (("missing keys", missing), ("unexpected keys", unexpected),
                              ("shape mismatches", wrong_shape)) if names]


def from_timm_resnest(state_dict, depth, where="timm ResNeSt state dict"):
  """timm `resnest{50d,101e,200e,269e}` / original ResNeSt state dict {key: np.ndarray} ->
  `resnest.resnest(depth)` variables ({"params", "batch_stats"}, float32 numpy); `where` (e.g.
  the file) starts the error messages.

  Keys: the stem `conv1.{0,3,6}` (convs), `conv1.{1,4}` and `bn1` (BN); per block
  `layer{i}.{j}.conv1`, `bn1`, `conv2.conv`, `conv2.bn0`, `conv2.fc1`, `conv2.bn1`,
  `conv2.fc2`, `conv3`, `bn3`, `downsample.1` (conv), `downsample.2` (BN). Missing and
  unexpected keys and shape mismatches raise one WeightsError naming them; the ImageNet
  classifier `fc.*` and `num_batches_tracked` are dropped.
  """
  expected = expected_resnest_shapes(depth)
  given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
  problems = key_problems(state_dict, expected, ignored_prefix="fc.")
  if problems:
    sizes = stage_sizes(given)
    found = {s: d for d, s in resnest.STAGE_SIZES.items()}.get(sizes)
    hint = (f" It has the blocks of a ResNeSt-{found} (config.model.backbone=resnest{found})."
            if found and found != depth else "")
    raise WeightsError(f"{where} does not fit ResNeSt-{depth} ({'; '.join(problems)}).{hint}")
  if given - set(expected):
    logging.info("Dropped the ImageNet classifier: %s", sorted(given - set(expected)))
  return _place(state_dict, expected)


def _listed(names):
  """At most `_MAX_LISTED` of `names` for an error message."""
  more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return f"{list(names[:_MAX_LISTED])}{more}"


def stage_sizes(keys):
  """Blocks per stage (4 ints) read from checkpoint or variable names; 0 for an absent stage.

  "layer3.22.conv1.weight" (torchvision) and "params/layer3_22/conv1/kernel" (converted) both
  count as block 22 of stage 3.
  """
  sizes = [0, 0, 0, 0]
  for key in keys:
    match = _BLOCK_KEY.search(key)
    if match:
      stage, block = int(match.group(1)) - 1, int(match.group(2))
      sizes[stage] = max(sizes[stage], block + 1)
  return tuple(sizes)


def check_depth(keys, depth, where):
  """Raises WeightsError naming the checkpoint's depth when its blocks are not ResNet-`depth`'s
  (bottleneck blocks, `resnet.STAGE_SIZES[depth]` per stage)."""
  sizes = stage_sizes(keys)
  bottleneck = any("conv3" in key for key in keys)
  if not any(sizes) or (bottleneck, sizes) == (True, resnet.STAGE_SIZES[depth]):
    return
  found = _TORCHVISION_DEPTHS.get((bottleneck, sizes))
  looks_like = f"a ResNet-{found}" if found else "an unknown ResNet"
  raise WeightsError(
      f"{where}: this looks like {looks_like} checkpoint (config.model.backbone=resnet{depth}): "
      f"{'bottleneck' if bottleneck else 'basic'} blocks per stage {sizes}, ResNet-{depth} has "
      f"bottleneck blocks {resnet.STAGE_SIZES[depth]}. Use ResNet-{depth} weights or set "
      "config.model.backbone to the checkpoint's depth (resnet50 | resnet101; --depth for "
      "`python -m rsepm_jax.models.convert`).")


def compare_keys(state_dict, depth):
  """(missing, unexpected) torchvision keys of `state_dict` for `resnet(depth)`, sorted.

  `num_batches_tracked` buffers are neither used nor reported.
  """
  expected = expected_torchvision_shapes(depth)
  given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
  return sorted(set(expected) - given), sorted(given - set(expected))


def from_torchvision(state_dict, depth, where="torchvision state dict"):
  """torchvision ResNet state dict {key: np.ndarray} -> `resnet(depth)` variables; `where`
  (e.g. the file) starts the error messages.

  Returns {"params": ..., "batch_stats": ...} of float32 numpy arrays. Missing keys and shape
  mismatches raise WeightsError; unexpected keys (e.g. `fc.*`) are logged and dropped.
  """
  check_depth(state_dict, depth, where)
  missing, unexpected = compare_keys(state_dict, depth)
  if missing:
    raise WeightsError(f"{where}: a ResNet-{depth} state dict lacks {len(missing)} keys: {_listed(missing)}")
  if any(not k.startswith("fc.") for k in unexpected):
    logging.warning("Dropped %d unexpected keys: %s", len(unexpected), _listed(unexpected))
  elif unexpected:
    logging.info("Dropped the ImageNet classifier: %s", unexpected)
  flat = {}
  for key, (collection, path, torch_shape) in expected_torchvision_shapes(depth).items():
    value = np.asarray(state_dict[key], np.float32)
    if value.shape != torch_shape:
      raise WeightsError(f"{where}: shape mismatch for {key}: checkpoint has {value.shape}, "
                       f"ResNet-{depth} expects {torch_shape}.")
    if collection == "params" and path[-1] == "kernel":
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    flat[(collection,) + path] = value
  return traverse_util.unflatten_dict(flat)


# Official `AffinityNet` modules by ours. RECONSTRUCTED: read off the module tree of
# `core/networks.py::AffinityNet` (commit 09d5aa6: `fc_edge1..5 = Sequential(conv, GroupNorm,
# [Upsample,] ReLU)`, `fc_edge6` conv); no AffinityNet weights were released, so no file has
# confirmed them. Its backbone is the same torchvision ResNet under `model.`.
_AFFINITY_MODULES = {
    "edge_1/conv": "fc_edge1.0", "edge_1/norm": "fc_edge1.1",
    "edge_2/conv": "fc_edge2.0", "edge_2/norm": "fc_edge2.1",
    "edge_3/conv": "fc_edge3.0", "edge_3/norm": "fc_edge3.1",
    "edge_4/conv": "fc_edge4.0", "edge_4/norm": "fc_edge4.1",
    "edge_5/conv": "fc_edge5.0", "edge_5/norm": "fc_edge5.1",
    "edge_logit": "fc_edge6",
}
# A PyTorch state dict repeats the edge layers under the ModuleList `edge_layers` (entry i is
# `fc_edge{i + 1}`); these copies are checked against the `fc_edge` tensors and dropped.
_AFFINITY_ALIAS = re.compile(r"^edge_layers\.(\d+)\.(.+)$")
# Official AffinityNet tensors with no counterpart here, dropped: the path-index buffers of
# `to_affinity` and the unused displacement branch (`with_instance`).
_AFFINITY_UNUSED = re.compile(r"^(path_indices_\d+|disp_target|mean_shift\..+|fc_dp\d+\..+)$")
# Official module names (`core/networks.py::RSEPM`, `DeepLabv3_Plus`, `DeepLabv2`,
# `core/layers.py`, `AffinityNet`) by our Flax ones; the backbone is torchvision's under `model.`.
_OFFICIAL_MODULES = {
    "classifier": "classifier",
    "aspp/branch_1x1": "aspp.aspp1",
    "aspp/image_pool": "aspp.global_avg_pool.1",
    "aspp/project": "aspp.block.0",
    "decoder/low_level": "decoder.low_block",
    "decoder/conv1": "decoder.classifier.0",
    "decoder/conv2": "decoder.classifier.2",
    "decoder/classifier": "decoder.classifier.4",
    **_AFFINITY_MODULES,
}
# Numbered ASPP branches: (our name, official number of branch 0). DeepLabv3's dilated branch i
# is `aspp.aspp{i + 2}` (`aspp1` is the 1x1 one); DeepLabv2's branch i is `aspp.aspp{i + 1}`.
_ASPP_BRANCHES = ((re.compile(r"^aspp/branch_3x3_(\d+)$"), 2),
                  (re.compile(r"^aspp/branch_(\d+)$"), 1))
# Keys a backbone-only checkpoint lacks.
_OFFICIAL_HEADS = ("classifier.", "aspp.", "decoder.", "fc_edge")
# Config keys read off an official checkpoint for errors: (key, tensor, its output channels less
# this many; the stage-2 logits count the background).
_OFFICIAL_SIZES = (("data.num_classes", "classifier.weight", 0),
                   ("data.num_classes", "decoder.classifier.4.weight", 1),
                   ("data.num_classes", "aspp.aspp1.weight", 1),
                   ("model.decoder_channels", "aspp.aspp1.conv.weight", 0),
                   ("model.low_level_channels", "decoder.low_block.conv.weight", 0))
# The config keys that shape each network's official tensors, for errors.
_SHAPING_KEYS = {
    "rsepm": "config.model.backbone, config.data.num_classes, config.model.decoder_channels / "
             "low_level_channels and config.model.with_decoder",
    "deeplabv3plus": "config.model.backbone, config.data.num_classes and "
                     "config.model.decoder_channels / low_level_channels",
    "deeplabv2": "config.model.backbone and config.data.num_classes",
    affinity.ARCH: "config.model.backbone",
}


def is_official(keys):
  """Whether checkpoint `keys` hold a whole official model (heads included), not only an
  ImageNet backbone."""
  return any(key.startswith(_OFFICIAL_HEADS) for key in keys)


def official_arch(keys):
  """The `config.model.arch` of an official checkpoint with `keys`, None for a backbone-only one.

  A CAM `classifier` is RS+EPM's, bare `aspp.aspp1.weight` (no conv + BN) DeepLabv2's, `fc_edge`
  layers AffinityNet's, other heads DeepLabv3+'s (docs: official_checkpoints.md).
  """
  keys = set(keys)
  if any(key.startswith("classifier.") for key in keys):
    return "rsepm"
  if "aspp.aspp1.weight" in keys:
    return "deeplabv2"
  if any(key.startswith("fc_edge") for key in keys):
    return affinity.ARCH
  return "deeplabv3plus" if is_official(keys) else None


def _official_module(name):
  """Official module of our head module `name` ("aspp/branch_3x3_1" -> "aspp.aspp3"), or None."""
  for pattern, first in _ASPP_BRANCHES:
    match = pattern.match(name)
    if match:
      return f"aspp.aspp{int(match.group(1)) + first}"
  return _OFFICIAL_MODULES.get(name)


def official_key(collection, path):
  """Flax variable path of a `networks.from_config` network -> official key.

  `("params", ("aspp", "branch_3x3_1", "conv", "kernel"))` -> "aspp.aspp3.conv.weight";
  `("params", ("aspp", "branch_0", "bias"))` (DeepLabv2) -> "aspp.aspp1.bias";
  `("params", ("backbone", "layer1_0", "conv1", "kernel"))` -> "model.layer1.0.conv1.weight".
  """
  if path[0] == "backbone":
    return "model." + torchvision_key(collection, path[1:])
  *modules, leaf = path
  for depth in range(len(modules), 0, -1):
    official = _official_module("/".join(modules[:depth]))
    if official is not None:
      return ".".join([official, *modules[depth:], _LEAF_NAMES[(collection, leaf)]])
  raise ValueError(f"No official name for the variable {collection}/{'/'.join(path)}.")


def _affinity_weights(state_dict, where):
  """An official AffinityNet state dict less its `edge_layers` copies (each checked equal to its
  `fc_edge` tensor, or taken for it when that is absent) and the tensors of `_AFFINITY_UNUSED`
  (logged)."""
  kept, dropped = {}, []
  for key, value in state_dict.items():
    alias = _AFFINITY_ALIAS.match(key)
    if alias:
      primary = f"fc_edge{int(alias.group(1)) + 1}.{alias.group(2)}"
      if primary not in state_dict:
        kept[primary] = value
      elif not np.array_equal(np.asarray(value), np.asarray(state_dict[primary])):
        raise WeightsError(f"{where}: {key} differs from {primary}; an AffinityNet state dict "
                           "holds the same edge layer under both names.")
    elif _AFFINITY_UNUSED.match(key):
      dropped.append(key)
    else:
      kept[key] = value
  if dropped:
    logging.info("%s: dropped %d AffinityNet tensors this model does not use (path indices, "
                 "displacement branch): %s", where, len(dropped), _listed(sorted(dropped)))
  return kept


def _from_official_layout(state_dict, template, where):
  """Official state dict -> variables shaped like `template` (arrays or `jax.ShapeDtypeStruct`s
  of the variables of a `networks.from_config` network), float32 numpy.

  A checkpoint of another network is named as such. Every key and shape is checked: missing or
  unexpected keys and shape mismatches raise one WeightsError naming them;
  `num_batches_tracked` is ignored. AffinityNet's duplicate and unused tensors are dropped first
  (`_affinity_weights`).
  """
  expected = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in traverse_util.flatten_dict(template[collection]).items():
      expected[official_key(collection, path)] = (
          collection, path, _to_torch_layout(collection, path, leaf.shape))
  arch, found = official_arch(expected), official_arch(state_dict)
  if found not in (None, arch):
    raise WeightsError(
        f"{where}: this looks like an official {networks.ARCH_NAMES[found]} checkpoint "
        f"(config.model.arch={arch!r}); set --config.model.arch={found}.")
  if arch == affinity.ARCH:
    state_dict = _affinity_weights(state_dict, where)
  depth = {sizes: depth for depth, sizes in resnet.STAGE_SIZES.items()}.get(stage_sizes(expected))
  if depth:  # a ResNet-101 checkpoint for a ResNet-50 is named as such
    check_depth([key for key in state_dict if key.startswith("model.")], depth, where)
  problems = key_problems(state_dict, expected)
  if problems:
    sizes = {}
    for name, key, background in _OFFICIAL_SIZES:
      if key in state_dict:
        sizes.setdefault(name, np.shape(state_dict[key])[0] - background)
    built = ", ".join(f"{name}={size}" for name, size in sizes.items())
    raise WeightsError(
        f"{where} does not fit the configured {networks.ARCH_NAMES[arch]} model "
        f"({'; '.join(problems)}). Check {_SHAPING_KEYS[arch]} against the checkpoint"
        f"{f' (it has {built})' if built else ''}.")
  return _place(state_dict, expected)


def from_official(state_dict, config, where="official state dict"):
  """Official state dict {key: np.ndarray} of the network of `config.model.arch` -> variables of
  `networks.from_config(config)` ({"params", "batch_stats"}, float32 numpy); `where` (e.g. the
  file) starts the error messages.

  Keys (docs: official_checkpoints.md): the torchvision backbone under `model.`, then RS+EPM:
  `classifier`, `aspp`, `decoder`; DeepLabv3+: `aspp`, `decoder`; DeepLabv2:
  `aspp.aspp{1..4}.weight/bias`. Conv kernels OIHW -> HWIO.
  """
  model = networks.from_config(config)
  size = config.data.crop_size
  template = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return _from_official_layout(state_dict, template, where)


def from_official_affinity(state_dict, backbone="resnet50", where="official state dict"):
  """Official AffinityNet state dict {key: np.ndarray} -> variables of
  `affinity.AffinityNet(backbone)` ({"params", "batch_stats"}, float32 numpy).

  Keys (RECONSTRUCTED from the official module tree, `_AFFINITY_MODULES`; no released file has
  confirmed them): the torchvision backbone under `model.`, `fc_edge{1..5}.0.weight` (1x1 conv),
  `fc_edge{1..5}.1.weight/bias` (GroupNorm), `fc_edge6.weight/bias`; `edge_layers.*` copies must
  equal them, path indices and the displacement branch are dropped. Every key and shape is
  checked as in `from_official`.
  """
  template = jax.eval_shape(affinity.AffinityNet(backbone=backbone).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  return _from_official_layout(state_dict, template, where)


def load_official(path, config):
  """`from_official` of the weights file `path`; a backbone-only (ImageNet) file is an error."""
  state_dict = load_state_dict(path)
  if not is_official(state_dict):
    raise WeightsError(
        f"{path} holds no official RS+EPM heads (no {' / '.join(_OFFICIAL_HEADS)} keys): an "
        "ImageNet backbone initialises training only. Evaluating, exporting or predicting needs "
        "a checkpoint in the workdir or a whole official RS+EPM checkpoint.")
  return from_official(state_dict, config, str(path))


def _strip_key_prefix(state_dict):
  for prefix in _KEY_PREFIXES:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
      return {k[len(prefix):]: v for k, v in state_dict.items()}
  return state_dict


def unwrap_state_dict(checkpoint, path):
  """The state dict of a training checkpoint `{"state_dict": {...}, ...}` or `{"model": {...}}`;
  a plain state dict is returned as it is."""
  for key in _WRAPPER_KEYS:
    if isinstance(checkpoint.get(key), dict):
      logging.info("%s: reading the weights under %r.", path, key)
      return checkpoint[key]
  tensors = {k: v for k, v in checkpoint.items() if hasattr(v, "shape")}
  if not tensors:
    raise WeightsError(f"{path} holds no weights: its top-level keys are {_listed(sorted(checkpoint))}, "
                     f"expected tensors or one of {list(_WRAPPER_KEYS)} holding them.")
  return tensors


def _load_torch_checkpoint(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading {path} needs PyTorch, which is not installed: `pip install .[torch]` (or "
        "torch), or convert it once where PyTorch is installed (`python -m "
        "rsepm_jax.models.convert resnet50.pth resnet50.safetensors`), or use the timm "
        "`resnet50.tv_in1k` .safetensors files.") from e
  checkpoint = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in unwrap_state_dict(checkpoint, path).items()}


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
  raise WeightsError(f"Unsupported weights file {path}: expected .safetensors, .pth, .pt "
                   "or .npz.")


def _check_same_shapes(expected, given, where):
  """Raise WeightsError unless the two trees have the same paths and leaf shapes."""
  expected = traverse_util.flatten_dict(expected, sep="/")
  given = traverse_util.flatten_dict(given, sep="/")
  missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
  if missing or extra:
    raise WeightsError(f"{where}: {len(missing)} missing variables {_listed(missing)}, "
                     f"{len(extra)} unexpected variables {_listed(extra)}.")
  for name, leaf in expected.items():
    if tuple(given[name].shape) != tuple(leaf.shape):
      raise WeightsError(f"Shape mismatch for {where}/{name}: weights have "
                       f"{tuple(given[name].shape)}, the model expects {tuple(leaf.shape)}.")


def load_backbone_variables(path, depth, arrays=None, family="resnet"):
  """`resnet(depth)` variables from a torchvision / timm checkpoint, or with `family="resnest"`
  `resnest.resnest(depth)` variables from a timm / original ResNeSt checkpoint, or either from a
  converted `.npz` (`arrays`: its `load_state_dict` when already read)."""
  arrays = load_state_dict(path) if arrays is None else arrays
  npz = epath.Path(path).suffix == ".npz"
  if family == "resnest":
    if not npz:
      return from_timm_resnest(arrays, depth, str(path))
    template = abstract_resnest_variables(depth)
  else:
    if not npz:
      return from_torchvision(arrays, depth, str(path))
    check_depth(arrays, depth, str(path))
    template = abstract_variables(depth)
  variables = traverse_util.unflatten_dict(arrays, sep="/")
  _check_same_shapes(template, variables, str(path))
  return variables


def load_into(variables, path, depth, family="resnet"):
  """Copy of network `variables` with `params/backbone` and `batch_stats/backbone` from `path`
  (a ResNet-`depth`, or with `family="resnest"` a ResNeSt-`depth`, backbone).

  The heads (classifier, ASPP, decoder) are left as they are, unless `path` is an official
  checkpoint (`is_official`): then every variable comes from it. Raises WeightsError when the
  weights do not fit the model (e.g. a depth mismatch).
  """
  arrays = load_state_dict(path)
  loaded = {collection: dict(tree) for collection, tree in variables.items()}
  if is_official(arrays):
    logging.info("%s is an official %s checkpoint: loading the whole model.", path,
                 networks.ARCH_NAMES[official_arch(arrays)])
    official = _from_official_layout(arrays, variables, str(path))
    for collection in ("params", "batch_stats"):
      loaded[collection] = jax.tree.map(lambda new, old: np.asarray(new, old.dtype),
                                        official[collection], variables[collection])
    return loaded
  backbone = load_backbone_variables(path, depth, arrays, family)
  for collection in ("params", "batch_stats"):
    target = variables[collection]["backbone"]
    _check_same_shapes(target, backbone[collection], f"{collection}/backbone")
    loaded[collection]["backbone"] = jax.tree.map(
        lambda new, old: np.asarray(new, old.dtype), backbone[collection], target)
  return loaded


def _write_arrays(dst, arrays):
  """Writes {name: np.ndarray} to `dst`: a `.safetensors` or an `.npz` file."""
  if dst.suffix == ".safetensors":
    dst.write_bytes(safetensors.numpy.save(arrays))
  elif dst.suffix == ".npz":
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    dst.write_bytes(buffer.getvalue())
  else:
    raise ValueError(f"Unsupported output {dst}: expected .npz or .safetensors.")


def convert_file(src, dst, depth=50):
  """Converts the torchvision checkpoint `src` to `dst`: an `.npz` of flattened variables, or a
  `.safetensors` of the torchvision keys the model uses (no PyTorch needed to read either).
  An official checkpoint (any of `networks.ARCHS`) keeps its own keys, `num_batches_tracked`
  dropped (its keys and shapes are checked when it is loaded)."""
  state_dict = load_state_dict(src)
  dst = epath.Path(dst)
  if is_official(state_dict):
    arrays = {key: np.asarray(value) for key, value in state_dict.items()
              if not key.endswith("num_batches_tracked")}
    _write_arrays(dst, arrays)
    print(f"Wrote the {len(arrays)} tensors of an official "
          f"{networks.ARCH_NAMES[official_arch(arrays)]} checkpoint to {dst} "
          "(for config.model.init_from)")
    return
  variables = from_torchvision(state_dict, depth, str(src))  # raises on a missing key or depth
  _, unexpected = compare_keys(state_dict, depth)
  print(f"Unexpected keys, dropped ({len(unexpected)}): {_listed(unexpected)}")
  if dst.suffix == ".safetensors":
    _write_arrays(dst, {key: np.asarray(state_dict[key], np.float32)
                        for key in expected_torchvision_shapes(depth)})
  else:
    _write_arrays(dst, traverse_util.flatten_dict(variables, sep="/"))
  print(f"Wrote ResNet-{depth} variables to {dst}")


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("Usage: python -m rsepm_jax.models.convert SRC DST [--depth 50]")
  convert_file(argv[1], argv[2], flags.FLAGS.depth)


if __name__ == "__main__":
  # Defined here, not at import, so importing this module adds no global flag.
  flags.DEFINE_integer("depth", 50, "ResNet depth of the checkpoint: 50 or 101.")
  app.run(main)
