"""DeepLabv3+ segmentation head of the RS+EPM network (spec 1.3), NHWC."""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsepm_jax import image_ops
from rsepm_jax.models import resnet


class ConvBlock(nn.Module):
  """conv(k, stride 1, pad dilation * (k // 2), no bias) -> BN -> ReLU (spec 1.3).

  x: [B, H, W, C] -> [B, H, W, features].
  """
  features: int
  kernel_size: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train=False):
    x = resnet.conv2d(self.features, self.kernel_size, dilation=self.dilation,
                      dtype=self.dtype, name="conv")(x)
    x = resnet.batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name, name="bn")(x)
    return nn.relu(x)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling of DeepLabv3 (spec 1.3).

  x: [B, h, w, C] -> [B, h, w, features]: a 1x1 branch, one 3x3 branch per dilation and an
  image-pooling branch, concatenated, projected by a 1x1 ConvBlock, then Dropout (0.5).
  Dropout is active when `train and dropout`.
  """
  features: int = 256
  dilations: Sequence[int] = (6, 12, 18)
  dropout: float = 0.5
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train=False, dropout=True):
    def conv_block(kernel_size, name, dilation=1):
      return ConvBlock(self.features, kernel_size, dilation, dtype=self.dtype,
                       bn_axis_name=self.bn_axis_name, name=name)

    branches = [conv_block(1, "branch_1x1")(x, train)]
    for i, dilation in enumerate(self.dilations):
      branches.append(conv_block(3, f"branch_3x3_{i}", dilation)(x, train))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = conv_block(1, "image_pool")(pooled, train)
    branches.append(image_ops.resize_bilinear(pooled, x.shape[1:3]))
    x = conv_block(1, "project")(jnp.concatenate(branches, axis=-1), train)
    return nn.Dropout(self.dropout, deterministic=not (train and dropout))(x)


class DeepLabV3PlusDecoder(nn.Module):
  """DeepLabv3+ decoder (spec 1.3).

  aspp_features: [B, h, w, D] (stride 16 or 8), low_level: [B, H4, W4, C2] (C2, stride 4)
  -> logits [B, H4, W4, num_classes + 1] (background first), in `dtype`. Dropout is active when
  `train and dropout`.
  """
  num_classes: int
  features: int = 256
  low_level_channels: int = 256
  dropout: Sequence[float] = (0.5, 0.1)  # after the first and the second 3x3 ConvBlock
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, aspp_features, low_level, train=False, dropout=True):
    def conv_block(features, kernel_size, name):
      return ConvBlock(features, kernel_size, dtype=self.dtype,
                       bn_axis_name=self.bn_axis_name, name=name)

    low_level = conv_block(self.low_level_channels, 1, "low_level")(low_level, train)
    upsampled = image_ops.resize_bilinear(aspp_features, low_level.shape[1:3])
    x = jnp.concatenate([upsampled, low_level], axis=-1)
    x = conv_block(self.features, 3, "conv1")(x, train)
    x = nn.Dropout(self.dropout[0], deterministic=not (train and dropout))(x)
    x = conv_block(self.features, 3, "conv2")(x, train)
    x = nn.Dropout(self.dropout[1], deterministic=not (train and dropout))(x)
    return resnet.conv2d(self.num_classes + 1, 3, dtype=self.dtype, name="classifier")(x)
