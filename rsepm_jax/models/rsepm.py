"""The single-stage RS+EPM network: ResNet backbone, CAM classifier, DeepLabv3+ head (spec 1)."""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsepm_jax.models import decoder
from rsepm_jax.models import resnet

BACKBONES = ("resnet50", "resnet101", "tiny")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.model.dtype


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
  backbone: str = "resnet50"  # one of BACKBONES
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

  def _backbone_module(self):
    common = dict(output_stride=self.output_stride, last_stride=self.last_stride,
                  dtype=self.dtype, bn_axis_name=self.bn_axis_name, name="backbone")
    if self.backbone == "resnet50":
      return resnet.resnet(50, **common)
    if self.backbone == "resnet101":
      return resnet.resnet(101, **common)
    if self.backbone == "tiny":
      return resnet.tiny_resnet(width=self.backbone_width, **common)
    raise ValueError(f"Unknown backbone {self.backbone!r}; choose one of {BACKBONES}.")

  @nn.compact
  def __call__(self, images, train=False, dropout=True, features=None):
    if features is None:
      features = self._backbone_module()(images, train)
    cams = resnet.conv2d(self.num_classes, 1, dtype=self.dtype, name="classifier")(
        features["C5"]).astype(jnp.float32)
    outputs = {"cams": cams, "cls_logits": jnp.mean(cams, axis=(1, 2)), "features": features}
    if self.with_decoder:
      dilations = self.aspp_dilations
      if dilations is None:
        dilations = (6, 12, 18) if self.output_stride == 16 else (12, 24, 36)
      aspp_features = decoder.ASPP(self.decoder_channels, dilations, self.aspp_dropout,
                                   dtype=self.dtype,
                                   bn_axis_name=self.bn_axis_name, name="aspp")(
                                       features["C5"], train, dropout)
      seg_logits = decoder.DeepLabV3PlusDecoder(
          self.num_classes, self.decoder_channels, self.low_level_channels,
          tuple(self.decoder_dropout), dtype=self.dtype, bn_axis_name=self.bn_axis_name, name="decoder")(
              aspp_features, features["C2"], train, dropout)
      outputs["seg_logits"] = seg_logits.astype(jnp.float32)
    return outputs


def from_config(config, bn_axis_name=None):
  """`RSEPMNet` from `config.model` and `config.data.num_classes`; BatchNorm statistics are
  averaged over the mesh axis `bn_axis_name` when given."""
  model_config = config.model
  if model_config.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={model_config.dtype!r}; expected one of {sorted(DTYPES)}.")
  return RSEPMNet(
      num_classes=config.data.num_classes,
      backbone=model_config.backbone,
      backbone_width=model_config.backbone_width,
      output_stride=model_config.output_stride,
      last_stride=model_config.last_stride,
      with_decoder=model_config.with_decoder,
      decoder_channels=model_config.decoder_channels,
      low_level_channels=model_config.low_level_channels,
      aspp_dilations=tuple(model_config.aspp_dilations) or None,
      aspp_dropout=model_config.aspp_dropout,
      decoder_dropout=tuple(model_config.decoder_dropout),
      dtype=DTYPES[model_config.dtype],
      bn_axis_name=bn_axis_name)
