"""The multi-stage variant's segmentation networks, DeepLabv3+ and DeepLabv2 (spec 9), NHWC.

Both take `images [B, H, W, 3]` float32 normalised and return
  seg_logits: float32 [B, ceil(H / s), ceil(W / s), num_classes + 1] (background first),
  features: {"C1".."C5"} backbone features in `dtype`,
with s = 4 for DeepLabv3+ (its decoder works on C2) and s = `output_stride` for DeepLabv2.
Submodule names follow `RSEPMNet`'s (`backbone`, `aspp`, `decoder`), so `models/convert.py` maps
the official checkpoints with the same table.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsepm_jax.models import backbones
from rsepm_jax.models import decoder
from rsepm_jax.models import resnet


def aspp_dilations(output_stride, dilations=None):
  """DeepLabv3's ASPP 3x3 dilations: `dilations` when given, else (6, 12, 18) at output stride
  16 and (12, 24, 36) at 8 (spec 1.3)."""
  if dilations:
    return tuple(dilations)
  return (6, 12, 18) if output_stride == 16 else (12, 24, 36)


def v3plus_head(net, features, train, dropout):
  """DeepLabv3+ head of `net`, called inside its compact `__call__`: ASPP on C5, then the
  decoder with C2 (spec 1.3), as `net`'s submodules `aspp` and `decoder`.

  `net` has the fields of `DeepLabV3Plus` (num_classes, output_stride, decoder_channels,
  low_level_channels, aspp_dilations, aspp_dropout, decoder_dropout, dtype, bn_axis_name).
  features: {"C2": [B, H4, W4, C2], "C5": [B, h, w, C5]} -> float32 [B, H4, W4, num_classes + 1].
  Dropout is active when `train and dropout`.
  """
  aspp_features = decoder.ASPP(
      net.decoder_channels, aspp_dilations(net.output_stride, net.aspp_dilations),
      net.aspp_dropout, dtype=net.dtype, bn_axis_name=net.bn_axis_name, name="aspp")(
          features["C5"], train, dropout)
  seg_logits = decoder.DeepLabV3PlusDecoder(
      net.num_classes, net.decoder_channels, net.low_level_channels, tuple(net.decoder_dropout),
      dtype=net.dtype, bn_axis_name=net.bn_axis_name, name="decoder")(
          aspp_features, features["C2"], train, dropout)
  return seg_logits.astype(jnp.float32)


class DeepLabV3Plus(nn.Module):
  """DeepLabv3+ (spec 9): ResNet backbone, ASPP on C5, decoder with a `low_level_channels` block
  on C2 (48 in the official model), logits at stride 4. No CAM classifier.

  `__call__(images, train=False, dropout=True)` -> {"seg_logits", "features"} (module docstring).
  """
  num_classes: int  # foreground classes; the logits have num_classes + 1
  backbone: str = "resnet101"  # one of backbones.BACKBONES
  backbone_width: int = 8  # stem width of the "tiny" backbone only
  output_stride: int = 8
  last_stride: int = 1
  decoder_channels: int = 256
  low_level_channels: int = 48
  aspp_dilations: Optional[Sequence[int]] = None  # None: (6, 12, 18) at OS16, x2 at OS8
  aspp_dropout: float = 0.5
  decoder_dropout: Sequence[float] = (0.5, 0.1)
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, train=False, dropout=True):
    features = backbones.backbone(
        self.backbone, self.backbone_width, output_stride=self.output_stride,
        last_stride=self.last_stride, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
        name="backbone")(images, train)
    return {"seg_logits": v3plus_head(self, features, train, dropout), "features": features}


class DeepLabV2Head(nn.Module):
  """DeepLabv2's ASPP: parallel 3x3 convs with a bias, dilation = padding d for each of
  `dilations`, outputs summed.

  x: [B, h, w, C] -> [B, h, w, num_classes + 1] in `dtype`. Convs `branch_0`..`branch_3` are the
  official `aspp.aspp1`..`aspp.aspp4`.
  """
  num_classes: int
  dilations: Sequence[int] = (6, 12, 18, 24)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return sum(resnet.conv2d(self.num_classes + 1, 3, dilation=d, use_bias=True,
                             dtype=self.dtype, name=f"branch_{i}")(x)
               for i, d in enumerate(self.dilations))


class DeepLabV2(nn.Module):
  """DeepLabv2 (spec 9): ResNet backbone, `DeepLabV2Head` on C5 (logits at `output_stride`;
  the official model: ResNet-101, output stride 8). It has no dropout.

  `__call__(images, train=False, dropout=True)` -> {"seg_logits", "features"} (module docstring).
  """
  num_classes: int  # foreground classes; the logits have num_classes + 1
  backbone: str = "resnet101"  # one of backbones.BACKBONES
  backbone_width: int = 8  # stem width of the "tiny" backbone only
  output_stride: int = 8
  last_stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, train=False, dropout=True):
    del dropout  # DeepLabv2 has none; the argument keeps the networks' common signature
    features = backbones.backbone(
        self.backbone, self.backbone_width, output_stride=self.output_stride,
        last_stride=self.last_stride, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
        name="backbone")(images, train)
    seg_logits = DeepLabV2Head(self.num_classes, dtype=self.dtype, name="aspp")(features["C5"])
    return {"seg_logits": seg_logits.astype(jnp.float32), "features": features}
