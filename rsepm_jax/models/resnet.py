"""Bottleneck ResNet-50/101 backbone in torchvision's v1.5 layout (spec 1.1), NHWC.

Submodule names follow torchvision's state-dict keys (`layer1_0/conv1` is `layer1.0.conv1`,
`layer1_0/downsample_conv` is `layer1.0.downsample.0`), so `models/convert.py` maps the
ImageNet weights mechanically. Paddings are PyTorch's explicit symmetric ones: Flax's 'SAME'
pads stride-2 layers asymmetrically on even sizes, which shifts every feature map.
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


# PyTorch's default conv init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) (spec 1.1).
pytorch_conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# config.model.backbone
EXPANSION = 4  # Bottleneck output channels = EXPANSION * width of its 3x3 conv.


def _nhwc_conv(x, kernel, strides, padding, dilation):
  return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_dot_kernel_grad(x, kernel, strides, padding, dilation):
  return _nhwc_conv(x, kernel, strides, padding, dilation)


def _conv_fwd(x, kernel, strides, padding, dilation):
  return _nhwc_conv(x, kernel, strides, padding, dilation), (x, kernel)


def _conv_bwd(strides, padding, dilation, residuals, grad):
  """Input gradient as XLA transposes the conv; kernel gradient as one matmul over the taps."""
  x, kernel = residuals
  (grad_x,) = jax.linear_transpose(
      lambda v: _nhwc_conv(v, kernel, strides, padding, dilation), x)(grad)
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  out_h, out_w = grad.shape[1:3]
  padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  # Tap (i, j) of the kernel sees the input pixels that the output grid hits at that offset.
  taps = [padded[:, i * dilation[0]:i * dilation[0] + strides[0] * (out_h - 1) + 1:strides[0],
                 j * dilation[1]:j * dilation[1] + strides[1] * (out_w - 1) + 1:strides[1]]
          for i in range(kernel_h) for j in range(kernel_w)]
  patches = taps[0][:, :, :, None] if len(taps) == 1 else jnp.stack(taps, axis=3)
  grad_kernel = jnp.einsum("bhwkc,bhwo->kco", patches, grad,
                           preferred_element_type=jnp.float32)
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


_conv_dot_kernel_grad.defvjp(_conv_fwd, _conv_bwd)


def _varying_axes(x):
  """The shard_map mesh axes over which `x` varies (empty outside shard_map)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def cpu_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for `nn.Conv` (NHWC, HWIO); on XLA:CPU with its kernel gradient
  computed as a matmul of the stacked input taps against the output gradient.

  XLA:CPU lowers the kernel gradient of a convolution to a convolution with an output-sized
  window, which ran 2.5-10x slower than its forward pass here (a 1x1 conv at 64x64: 60 ms against
  5 ms; the decoder's 3x3 512->256 conv at 64x64: 1.3 s against 0.5 s as a matmul). The result is
  the same up to float summation order. Other backends (cuDNN, TPU) keep XLA's own gradient.
  """
  del dimension_numbers  # nn.Conv's NHWC / HWIO, checked below through the shapes
  plain = (lhs_dilation in (None, (1, 1)) and feature_group_count == 1 and precision is None
           and lhs.ndim == 4 and not isinstance(padding, str))
  dilation = tuple(rhs_dilation or (1, 1))
  if not plain or jax.default_backend() != "cpu":
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=feature_group_count,
        precision=precision)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  # Inside shard_map the kernel is replicated while the images vary over the batch axis: made
  # varying here, so the psum of its gradient is JAX's transpose of this cast, as without the
  # custom gradient.
  varying = tuple(sorted(_varying_axes(lhs) - _varying_axes(rhs)))
  if varying:
    rhs = lax.pcast(rhs, varying, to="varying")
  return _conv_dot_kernel_grad(lhs, rhs, tuple(window_strides), padding, dilation)


def conv2d(features, kernel_size, *, stride=1, dilation=1, use_bias=False, dtype=jnp.float32,
           name=None):
  """Square conv with PyTorch padding `dilation * (kernel_size // 2)` and kernel init; bias-free
  unless `use_bias` (the bias starts at 0)."""
  pad = dilation * (kernel_size // 2)
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=stride,
      padding=((pad, pad), (pad, pad)),
      kernel_dilation=dilation,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=pytorch_conv_init,
      conv_general_dilated=cpu_conv,
      name=name,
  )


def batch_norm(train, *, dtype=jnp.float32, axis_name=None, name=None):
  """PyTorch `BatchNorm2d` defaults: momentum 0.1 (Flax 0.9), eps 1e-5, scale 1, bias 0.

  `axis_name` synchronises the batch statistics across a mapped axis (shard_map).
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      axis_name=axis_name,
      name=name,
  )


def stage_strides_and_dilations(output_stride, last_stride):
  """(strides, dilations) of layer1..layer4 for `build_resnet` (spec 1.1).

  The stem conv and maxpool always give stride 4 and layer1 has stride 1, so the spec's
  `strides (2, 2, 2, last_stride)` (stem, layer2, layer3, layer4) become per-stage
  `(1, 2, 2, last_stride)` for OS16 and `(1, 2, 1, last_stride)` for OS8.
  """
  if output_stride == 16:
    return (1, 2, 2, last_stride), (1, 1, 1, 1)
  if output_stride == 8:
    return (1, 2, 1, last_stride), (1, 1, 2, 4)
  raise ValueError(f"output_stride must be 8 or 16, got {output_stride}.")


class Bottleneck(nn.Module):
  """torchvision Bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), residual, ReLU.

  x: [B, H, W, C] -> [B, H / stride, W / stride, EXPANSION * width].
  """
  width: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train=False):
    def norm(name):
      return batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name, name=name)

    out_features = EXPANSION * self.width
    y = conv2d(self.width, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = conv2d(self.width, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype,
               name="conv2")(y)
    y = nn.relu(norm("bn2")(y))
    y = conv2d(out_features, 1, dtype=self.dtype, name="conv3")(y)
    y = norm("bn3")(y)
    if self.stride != 1 or x.shape[-1] != out_features:
      x = conv2d(out_features, 1, stride=self.stride, dtype=self.dtype,
                 name="downsample_conv")(x)
      x = norm("downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Bottleneck ResNet returning C1..C5 (spec 1.1).

  images: [B, H, W, 3] float32 normalised -> {"C1": after maxpool (stride 4, width),
  "C2".."C5": layer1..layer4 outputs (EXPANSION * width * 2^i channels)}, NHWC in `dtype`.
  As in RS+EPM's `_make_layer`, the first block of every stage is undilated; only blocks
  2..n use the stage dilation.
  """
  stage_sizes: Sequence[int]
  width: int = 64
  output_stride: int = 16
  last_stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, train=False):
    strides, dilations = stage_strides_and_dilations(self.output_stride, self.last_stride)
    x = conv2d(self.width, 7, stride=2, dtype=self.dtype, name="conv1")(images)
    x = batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name, name="bn1")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    features = {"C1": x}
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = Bottleneck(
            width=self.width * 2**stage,
            stride=strides[stage] if block == 0 else 1,
            dilation=1 if block == 0 else dilations[stage],
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            name=f"layer{stage + 1}_{block}",
        )(x, train)
      features[f"C{stage + 2}"] = x
    return features


def resnet(depth, output_stride=16, last_stride=1, **kwargs):
  """ResNet-50 or ResNet-101 (spec 1.1); `kwargs` go to `ResNet` (dtype, bn_axis_name, name)."""
  if depth not in STAGE_SIZES:
    raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, got {depth}.")
  return ResNet(stage_sizes=STAGE_SIZES[depth], output_stride=output_stride,
                last_stride=last_stride, **kwargs)


def tiny_resnet(width=8, **kwargs):
  """One block per stage and a narrow stem, for tests and the demo."""
  return ResNet(stage_sizes=(1, 1, 1, 1), width=width, **kwargs)
