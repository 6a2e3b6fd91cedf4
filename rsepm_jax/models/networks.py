"""The network of `config.model.arch`: the single-stage `RSEPMNet`, a multi-stage segmentation
network (`deeplab.DeepLabV3Plus`, `deeplab.DeepLabV2`; spec 9) or the multi-stage pipeline's
boundary network (`affinity.AffinityNet`)."""
import jax.numpy as jnp

from rsepm_jax.models import affinity
from rsepm_jax.models import deeplab
from rsepm_jax.models import rsepm

ARCHS = ("rsepm", "deeplabv3plus", "deeplabv2", affinity.ARCH)  # config.model.arch
ARCH_NAMES = {"rsepm": "RS+EPM", "deeplabv3plus": "DeepLabv3+", "deeplabv2": "DeepLabv2",
              affinity.ARCH: affinity.ARCH_NAME}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.model.dtype


def from_config(config, bn_axis_name=None):
  """The network of `config.model.arch` from `config.model` and `config.data.num_classes`;
  BatchNorm statistics are averaged over the mesh axis `bn_axis_name` when given.

  DeepLabv3+ reads the ASPP / decoder keys as RSEPMNet does (not `with_decoder`); DeepLabv2
  reads only the backbone keys. AffinityNet reads `backbone`, `backbone_width` and `dtype`: its
  frozen backbone has the official output stride 16 and last stride 1, its fixed BN no
  `bn_axis_name`, and it has no classes.
  """
  model_config = config.model
  if model_config.arch not in ARCHS:
    raise ValueError(f"config.model.arch={model_config.arch!r}; expected one of {ARCHS}.")
  if model_config.dtype not in DTYPES:
    raise ValueError(
        f"config.model.dtype={model_config.dtype!r}; expected one of {sorted(DTYPES)}.")
  if model_config.arch == affinity.ARCH:
    return affinity.AffinityNet(backbone=model_config.backbone,
                                backbone_width=model_config.backbone_width,
                                dtype=DTYPES[model_config.dtype])
  common = dict(
      num_classes=config.data.num_classes,
      backbone=model_config.backbone,
      backbone_width=model_config.backbone_width,
      output_stride=model_config.output_stride,
      last_stride=model_config.last_stride,
      dtype=DTYPES[model_config.dtype],
      bn_axis_name=bn_axis_name)
  if model_config.arch == "deeplabv2":
    return deeplab.DeepLabV2(**common)
  head = dict(
      decoder_channels=model_config.decoder_channels,
      low_level_channels=model_config.low_level_channels,
      aspp_dilations=tuple(model_config.aspp_dilations) or None,
      aspp_dropout=model_config.aspp_dropout,
      decoder_dropout=tuple(model_config.decoder_dropout))
  if model_config.arch == "deeplabv3plus":
    return deeplab.DeepLabV3Plus(**common, **head)
  return rsepm.RSEPMNet(**common, **head, with_decoder=model_config.with_decoder)
