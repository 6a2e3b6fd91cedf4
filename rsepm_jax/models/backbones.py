"""The backbone of `config.model.backbone`: torchvision-layout ResNets or ResNeSts."""
from rsepm_jax.models import resnest
from rsepm_jax.models import resnet

BACKBONES = ("resnet50", "resnet101", "resnest50", "resnest101", "resnest200", "resnest269", "tiny")


def backbone(kind, tiny_width=8, **kwargs):
  """The `resnet.ResNet` / `resnest.ResNeSt` of `kind` (one of BACKBONES) returning {"C1".."C5"};
  `tiny_width` is the stem width of "tiny" only; `kwargs` go to the module (output_stride,
  last_stride, dtype, bn_axis_name, name)."""
  if kind in ("resnet50", "resnet101"):
    return resnet.resnet(int(kind[len("resnet"):]), **kwargs)
  if kind.startswith("resnest") and kind in BACKBONES:
    return resnest.resnest(int(kind[len("resnest"):]), **kwargs)
  if kind == "tiny":
    return resnet.tiny_resnet(width=tiny_width, **kwargs)
  raise ValueError(f"Unknown backbone {kind!r}; choose one of {BACKBONES}.")
