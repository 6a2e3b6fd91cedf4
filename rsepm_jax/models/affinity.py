"""The multi-stage pipeline's boundary network, IRNet's edge branch as the official
`core/networks.py::AffinityNet` builds it (spec 9; components spec D.2), NHWC.

`AffinityNet` takes `images [B, H, W, 3]` float32 normalised and returns
  edge_logits: float32 [B, ceil(H / 4), ceil(W / 4), 1], the boundary logit at stride 4,
  features: {"C1".."C5"} backbone features in `dtype` (gradient-free).
The backbone is frozen as in the official model (`FixedBatchNorm`, features detached): it always
runs with its BN running statistics and its features are under `lax.stop_gradient`, so only the
edge layers learn (`param_labels` / `freeze_backbone` give the optimiser the same split).

Edge branch i on C_i: 1x1 conv (no bias) to 32 -> GroupNorm(4 groups, eps 1e-3) -> bilinear
upsampling (align_corners=False) to stride 4 -> ReLU, in the official order (GN, upsample, ReLU);
the five branches are cropped to C2's size, concatenated (160 channels) and a 1x1 conv with a bias
gives the logit. C1 is `resnet.ResNet`'s "after maxpool" feature (stride 4, 64 channels for
ResNet-50), which is the official `Backbone`'s C1 (`in_channels[0] = 64`, spec 1.1); C2..C5 are
layer1..layer4. With the official output stride 16 and last stride 1, C3 is upsampled x2 and C4,
C5 x4 (the factors follow the backbone's strides for other settings).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from rsepm_jax import image_ops
from rsepm_jax.models import backbones
from rsepm_jax.models import resnet

ARCH = "affinity"  # the config.model.arch this network would take
ARCH_NAME = "AffinityNet"
EDGE_STRIDE = 4  # input pixels per edge cell (C2's stride)
GET_EDGE_SIZE = 512  # the official `get_edge` pads every image to 512 x 512
LARGE_MULTIPLE = 16  # a side over the pad size is padded to a multiple of C4 / C5's stride


class EdgeBranch(nn.Module):
  """One edge branch: 1x1 conv (no bias) -> GroupNorm -> bilinear x`upsample` -> ReLU.

  x: [B, h, w, C] -> [B, upsample * h, upsample * w, features] in `dtype`. Submodules `conv`
  and `norm` are the official `fc_edge{i}.0` and `fc_edge{i}.1`.
  """
  features: int = 32
  groups: int = 4
  epsilon: float = 1e-3
  upsample: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = resnet.conv2d(self.features, 1, dtype=self.dtype, name="conv")(x)
    x = nn.GroupNorm(num_groups=self.groups, epsilon=self.epsilon, dtype=self.dtype,
                     param_dtype=jnp.float32, use_fast_variance=False, name="norm")(x)
    if self.upsample > 1:
      x = image_ops.resize_bilinear(x, (self.upsample * x.shape[1], self.upsample * x.shape[2]))
    return nn.relu(x)


def branch_upsampling(output_stride, last_stride):
  """Upsampling factors of the edge branches on C1..C5 to C2's grid: (1, 1, 2, 4, 4) for the
  official output stride 16 and last stride 1."""
  strides, _ = resnet.stage_strides_and_dilations(output_stride, last_stride)
  return (1, 1) + tuple(int(f) for f in np.cumprod(strides[1:]))


class AffinityNet(nn.Module):
  """IRNet's boundary network on a frozen ResNet (module docstring).

  `__call__(images, train=False, dropout=True)` -> {"edge_logits", "features"}. `train` and
  `dropout` keep the networks' common signature: the backbone's BN always uses its running
  statistics and nothing here has dropout or batch statistics. Submodules: `backbone`,
  `edge_1`..`edge_5` (`EdgeBranch`), `edge_logit` (1x1 conv with a bias).
  """
  backbone: str = "resnet50"  # one of backbones.BACKBONES
  backbone_width: int = 8  # stem width of the "tiny" backbone only
  output_stride: int = 16
  last_stride: int = 1
  edge_features: int = 32
  norm_groups: int = 4
  norm_epsilon: float = 1e-3  # the official nn.GroupNorm(4, 32, eps=1e-3)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train=False, dropout=True):
    del train, dropout  # fixed BN, no dropout (class docstring)
    features = backbones.backbone(
        self.backbone, self.backbone_width, output_stride=self.output_stride,
        last_stride=self.last_stride, dtype=self.dtype, name="backbone")(images, False)
    features = {name: lax.stop_gradient(x) for name, x in features.items()}
    height, width = features["C2"].shape[1:3]
    branches = []
    for i, factor in enumerate(branch_upsampling(self.output_stride, self.last_stride), 1):
      x = EdgeBranch(self.edge_features, self.norm_groups, self.norm_epsilon, factor,
                     dtype=self.dtype, name=f"edge_{i}")(features[f"C{i}"])
      branches.append(x[:, :height, :width])
    edge_logits = resnet.conv2d(1, 1, use_bias=True, dtype=self.dtype, name="edge_logit")(
        jnp.concatenate(branches, axis=-1))
    return {"edge_logits": edge_logits.astype(jnp.float32), "features": features}


def param_labels(params):
  """Pytree of labels with the structure of `AffinityNet` `params`: "frozen" under
  `backbone`, "edge" elsewhere (the official optimiser gets the edge layers only)."""
  label = lambda name: "frozen" if name == "backbone" else "edge"
  return {name: jax.tree.map(lambda _: label(name), tree) for name, tree in params.items()}


def freeze_backbone(tx):
  """`tx` on the edge layers of `AffinityNet` params; backbone updates are zero."""
  return optax.multi_transform({"edge": tx, "frozen": optax.set_to_zero()}, param_labels)


def padded_size(height, width, image_size=GET_EDGE_SIZE):
  """(H', W') an image is zero-padded to for `edge_maps`: `image_size` per side, and a longer side
  up to a multiple of `LARGE_MULTIPLE` (the official `get_edge` would crop it instead)."""
  return tuple(max(image_size, -(-side // LARGE_MULTIPLE) * LARGE_MULTIPLE)
               for side in (height, width))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _edge_maps(model, variables, images, padded):
  """Jitted `edge_maps` for uint8 `images [B, H, W, 3]` padded to `padded` = (H', W')."""
  batch, height, width = images.shape[:3]
  views = image_ops.normalize(images)
  views = jnp.concatenate([views, views[:, :, ::-1]], axis=0)  # the flips, padded like the images
  views = jnp.pad(views, ((0, 0), (0, padded[0] - height), (0, padded[1] - width), (0, 0)))
  logits = model.apply(variables, views)["edge_logits"][..., 0]
  logits = logits[:, :-(-height // EDGE_STRIDE), :-(-width // EDGE_STRIDE)]
  return jax.nn.sigmoid((logits[:batch] + logits[batch:, :, ::-1]) / 2)


def edge_maps(model, variables, images, image_size=GET_EDGE_SIZE):
  """Boundary maps of the official `get_edge` for same-size images (components spec D.2,
  inference steps 1-2).

  images: uint8 `[B, H, W, 3]` RGB -> float32 `[B, ceil(H / 4), ceil(W / 4)]` in (0, 1). Each
  image and its horizontal flip are normalised, zero-padded on the right and bottom to
  `padded_size(H, W, image_size)` and run in one batch; edge = sigmoid((e + flip(e')) / 2) of
  the logits cropped to the image's cells. One compilation per (B, H, W, padded size).
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"edge_maps expects RGB images [B, H, W, 3], got shape {images.shape}.")
  return _edge_maps(model, variables, images, padded_size(*images.shape[1:3], image_size))


def get_edge(model, variables, image, image_size=GET_EDGE_SIZE):
  """`edge_maps` of one uint8 image `[H, W, 3]` -> float32 `[ceil(H / 4), ceil(W / 4)]`."""
  image = jnp.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"get_edge expects one RGB image [H, W, 3], got shape {image.shape}.")
  return edge_maps(model, variables, image[None], image_size)[0]
