"""ResNeSt-50/101/200/269 backbones (spec A.1), NHWC, as the original ResNeSt / timm's
`resnest50d`, `resnest101e`, `resnest200e`, `resnest269e`.

Deep stem (three 3x3 convs), split-attention bottlenecks (radix 2, cardinality 1, bottleneck
width 64), average-pool downsampling in the shortcut and the "avd" 3x3 average pool after the
split attention in place of a strided conv. Dilation follows the original ResNeSt that Puzzle-CAM
builds with `dilated=False, dilation=2` (OS16: layer3 stride 2, layer4 stride 1 dilated 2): the
first block of a stage has half the stage dilation (1 for dilation 1 or 2), and the first block
of layer2..layer4 applies the avd pool even at stride 1 (the original's `is_first`; timm
leaves it out).

Submodule names follow the checkpoints' keys (`conv1_0` is `conv1.0`, `layer1_0/conv2/fc1` is
`layer1.0.conv2.fc1`, `layer1_0/downsample_1` is `layer1.0.downsample.1`), so
`convert.from_timm_resnest` maps them with `convert.torchvision_key`.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsepm_jax.models import resnet

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 200: (3, 24, 36, 3), 269: (3, 30, 48, 8)}
STEM_WIDTHS = {50: 32, 101: 64, 200: 64, 269: 64}  # the stem's output has twice as many channels
EXPANSION = 4  # Bottleneck output channels = EXPANSION * width.


def attention_channels(width, radix):
  """Channels of the split attention's fc1: max(width * radix // 4, 32)."""
  return max(width * radix // 4, 32)


class SplitAttention(nn.Module):
  """Split-attention 3x3 conv (`SplAtConv2d`, cardinality 1).

  x: [B, H, W, width] -> [B, H, W, width]. A 3x3 conv with `radix` groups gives `radix` splits
  of `width` channels (BN, ReLU); their sum is pooled globally, fc1 (1x1 conv with a bias, BN,
  ReLU) and fc2 (1x1 conv with a bias) give `radix * width` logits, softmax across the splits
  weights them, and the weighted splits are summed. Channel r * width + c is channel c of
  split r, as in PyTorch.
  """
  width: int
  dilation: int = 1
  radix: int = 2
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train=False):
    def norm(name):
      return resnet.batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name, name=name)

    pad = self.dilation
    y = nn.Conv(self.radix * self.width, (3, 3), padding=((pad, pad), (pad, pad)),
                kernel_dilation=self.dilation, feature_group_count=self.radix, use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, kernel_init=resnet.pytorch_conv_init,
                conv_general_dilated=resnet.cpu_conv, name="conv")(x)
    y = nn.relu(norm("bn0")(y))
    splits = y.reshape(y.shape[:3] + (self.radix, self.width))  # [B, H, W, radix, width]
    gap = jnp.mean(jnp.sum(splits, axis=3), axis=(1, 2), keepdims=True)  # [B, 1, 1, width]
    a = resnet.conv2d(attention_channels(self.width, self.radix), 1, use_bias=True,
                      dtype=self.dtype, name="fc1")(gap)
    a = nn.relu(norm("bn1")(a))
    a = resnet.conv2d(self.radix * self.width, 1, use_bias=True, dtype=self.dtype,
                      name="fc2")(a)
    a = jax.nn.softmax(a.reshape(a.shape[:3] + (self.radix, self.width)), axis=3)
    return jnp.sum(splits * a, axis=3)


def stage_strides_and_dilations(output_stride, last_stride):
  """(strides, dilations) of layer1..layer4 as the original ResNeSt (spec A.1).

  Strides are `resnet.stage_strides_and_dilations`'; from layer3 on, every stage run at stride 1
  doubles the dilation, so OS16 gives dilations (1, 1, 1, 2) (`dilation=2`) and OS8
  (1, 1, 2, 4) (`dilated=True`).
  """
  strides, _ = resnet.stage_strides_and_dilations(output_stride, last_stride)
  dilation, dilations = 1, []
  for stage, stride in enumerate(strides):
    if stage >= 2 and stride == 1:
      dilation *= 2
    dilations.append(dilation)
  return strides, tuple(dilations)


def _ceil_avg_pool(x, stride):
  """PyTorch `AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)`: windows that
  run past the bottom / right edge average the pixels they cover. [B, H, W, C] ->
  [B, ceil(H / stride), ceil(W / stride), C]."""
  pads = tuple((0, -size % stride) for size in x.shape[1:3])
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride), padding=pads,
                     count_include_pad=False)


class Bottleneck(nn.Module):
  """ResNeSt bottleneck: 1x1 -> split attention (dilation) -> [avd pool] -> 1x1 (x4), residual
  through [ceil avg pool] -> 1x1 conv -> BN when the shape changes, ReLU.

  x: [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), EXPANSION * width]. The avd pool
  (3x3, stride `stride`, padding 1, zeros counted) runs when `stride > 1` or `is_first`.
  """
  width: int
  stride: int = 1
  dilation: int = 1
  is_first: bool = False
  radix: int = 2
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train=False):
    def norm(name):
      return resnet.batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name, name=name)

    out_features = EXPANSION * self.width
    y = resnet.conv2d(self.width, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = SplitAttention(self.width, self.dilation, self.radix, dtype=self.dtype,
                       bn_axis_name=self.bn_axis_name, name="conv2")(y, train)
    if self.stride > 1 or self.is_first:
      y = nn.avg_pool(y, (3, 3), strides=(self.stride, self.stride), padding=((1, 1), (1, 1)))
    y = resnet.conv2d(out_features, 1, dtype=self.dtype, name="conv3")(y)
    y = norm("bn3")(y)
    if self.stride != 1 or x.shape[-1] != out_features:
      if self.stride != 1:
        x = _ceil_avg_pool(x, self.stride)
      x = resnet.conv2d(out_features, 1, dtype=self.dtype, name="downsample_1")(x)
      x = norm("downsample_2")(x)
    return nn.relu(x + y)


class ResNeSt(nn.Module):
  """ResNeSt returning C1..C5 like `resnet.ResNet`.

  images: [B, H, W, 3] float32 normalised -> {"C1": after the stem and maxpool (stride 4,
  2 * stem_width channels), "C2".."C5": layer1..layer4 outputs (EXPANSION * width * 2^i
  channels)}, NHWC in `dtype`. Strides are `resnet.ResNet`'s, dilations the original's
  (`stage_strides_and_dilations`).
  """
  stage_sizes: Sequence[int]
  stem_width: int = 32
  width: int = 64
  output_stride: int = 16
  last_stride: int = 1
  radix: int = 2
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, train=False):
    def norm(name):
      return resnet.batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name, name=name)

    strides, dilations = stage_strides_and_dilations(self.output_stride, self.last_stride)
    x = resnet.conv2d(self.stem_width, 3, stride=2, dtype=self.dtype, name="conv1_0")(images)
    x = nn.relu(norm("conv1_1")(x))
    x = resnet.conv2d(self.stem_width, 3, dtype=self.dtype, name="conv1_3")(x)
    x = nn.relu(norm("conv1_4")(x))
    x = resnet.conv2d(2 * self.stem_width, 3, dtype=self.dtype, name="conv1_6")(x)
    x = nn.relu(norm("bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    features = {"C1": x}
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = Bottleneck(
            width=self.width * 2**stage,
            stride=strides[stage] if block == 0 else 1,
            dilation=max(1, dilations[stage] // 2) if block == 0 else dilations[stage],
            is_first=block == 0 and stage > 0,
            radix=self.radix,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            name=f"layer{stage + 1}_{block}",
        )(x, train)
      features[f"C{stage + 2}"] = x
    return features


def resnest(depth, output_stride=16, last_stride=1, **kwargs):
  """ResNeSt-`depth` (50, 101, 200 or 269); `kwargs` go to `ResNeSt` (dtype, bn_axis_name,
  name)."""
  if depth not in STAGE_SIZES:
    raise ValueError(f"ResNeSt depth must be one of {sorted(STAGE_SIZES)}, got {depth}.")
  return ResNeSt(stage_sizes=STAGE_SIZES[depth], stem_width=STEM_WIDTHS[depth],
                 output_stride=output_stride, last_stride=last_stride, **kwargs)
