"""The single-stage RS+EPM network: ResNet backbone, CAM classifier, DeepLabv3+ head (spec 1)."""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsepm_jax.models import backbones
from rsepm_jax.models import deeplab
from rsepm_jax.models import resnet


def cam_stride(output_stride, last_stride):
  """Input pixels per CAM cell: layer4 runs at `output_stride` times its own `last_stride`."""
  return output_stride * last_stride


def normalized_cam(cams):
  """Per-class max-normalised CAM, `relu(cam) / (max_hw relu(cam) + 1e-5)` (spec 1.2).

  cams: [B, h, w, C] raw CAM logits -> [B, h, w, C] in [0, 1); all-negative maps give 0.
  """
  cams = nn.relu(cams)
  return cams / (jnp.max(cams, axis=(1, 2), keepdims=True) + 1e-5)


class RSEPMNet(nn.Module):
  """RS+EPM network (spec 1.1-1.3).

  `__call__(images [B, H, W, 3] float32 normalised, train, dropout=True, features=None)` returns
    cams: [B, H/s, W/s, C] float32 raw CAM logits (s = `cam_stride(output_stride, last_stride)`),
    cls_logits: [B, C] float32, the global average of `cams`,
    features: {"C1".."C5"} backbone features in `dtype`,
    seg_logits: [B, H/4, W/4, C + 1] float32 decoder logits (only when `with_decoder`).
  Submodules: `backbone`, `classifier` (1x1 conv, no bias), `aspp`, `decoder`.
  Dropout of the decoder head is active when `train and dropout`. Given `features` (the dict of
  an earlier call), the backbone is skipped and only the heads run on them (`images` unused):
  RecurSeed re-runs the decoder head without dropout this way.
  """
  num_classes: int
  backbone: str = "resnet50"  # one of backbones.BACKBONES
  backbone_width: int = 8  # stem width of the "tiny" backbone only
  output_stride: int = 16
  last_stride: int = 1
  with_decoder: bool = True
  decoder_channels: int = 256
  low_level_channels: int = 256  # 256 in RS+EPM, 48 in the multi-stage DeepLabv3+
  aspp_dilations: Optional[Sequence[int]] = None  # None: (6, 12, 18) at OS16, x2 at OS8
  aspp_dropout: float = 0.5
  decoder_dropout: Sequence[float] = (0.5, 0.1)
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, train=False, dropout=True, features=None):
    if features is None:
      features = backbones.backbone(
          self.backbone, self.backbone_width, output_stride=self.output_stride,
          last_stride=self.last_stride, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
          name="backbone")(images, train)
    cams = resnet.conv2d(self.num_classes, 1, dtype=self.dtype, name="classifier")(
        features["C5"]).astype(jnp.float32)
    outputs = {"cams": cams, "cls_logits": jnp.mean(cams, axis=(1, 2)), "features": features}
    if self.with_decoder:
      outputs["seg_logits"] = deeplab.v3plus_head(self, features, train, dropout)
    return outputs
