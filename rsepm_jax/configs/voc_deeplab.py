r"""PASCAL VOC 2012: the multi-stage pipeline's DeepLabv3+ trained on pseudo labels (spec 9).

Stage 1 writes pseudo labels of train_aug with a trained RS+EPM network (`--mode=export` of
configs/voc.py, `--config.export.protocol=paper`: `<workdir>/pseudo_labels/train_aug/<id>.png`);
this config trains DeepLabv3+ fully supervised on them and evaluates it on val with GT masks:

  python -m rsepm_jax.main --config=configs/voc_deeplab.py \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.train_mask_dir=/ckpt/rsepm_voc/pseudo_labels/train_aug \
      --config.model.init_from=/weights/resnet101.pth --workdir=/ckpt/deeplab_voc

then `--mode=eval` with the same flags scores val with the paper's protocol (multi-scale + flip,
dense CRF; spec 8.1, 9). DeepLabv2: add `--config.model.arch=deeplabv2`.

Variants (`--config=configs/voc_deeplab.py:VARIANT`):
  (none)  DeepLabv3+ ResNet-101, output stride 8, low-level block 48, with the PuzzleCAM DeepLab
          recipe (spec 7.2, 9): global batch 32, 50 epochs, LR 0.007 (poly 0.9; groups 1 / 2 /
          10 / 20), weight decay 4e-5, Nesterov, long side U{256..1024}, 512 crops.
  smoke   the same readers, a tiny ResNet on 64 px crops: 2 epochs of 2 steps, then the
          single-scale evaluation; for checking a set-up on a few images.

Without `data.train_mask_dir` it trains on the data set's masks (the fully supervised
baseline). Every knob is described in rsepm_jax/configs/demo.py.
"""
from rsepm_jax.configs import voc


def get_config(arg=None):
  """Returns the config; `arg` selects a variant ("smoke")."""
  variant = arg or ""
  if variant not in ("", "smoke"):
    raise ValueError(f"configs/voc_deeplab.py: unknown variant {arg!r}; expected one of: '', "
                     "'smoke'.")
  config = voc.get_config(variant)
  config.data.train_mask_dir = ""  # the pseudo labels of train_aug (see the docstring)
  config.model.arch = "deeplabv3plus"
  config.model.backbone = "resnet101"
  config.model.output_stride = 8
  config.model.decoder_channels = 256
  config.model.low_level_channels = 48
  config.model.aspp_dilations = ()  # (12, 24, 36) at output stride 8
  config.data.resize_range = (256, 1024)
  config.data.crop_size = 512

  config.optim.lr = 0.007
  config.optim.weight_decay = 4e-5
  config.optim.nesterov = True
  config.optim.lr_backbone_weight = 1.0
  config.optim.lr_backbone_bias = 2.0
  config.optim.lr_new_weight = 10.0
  config.optim.lr_new_bias = 20.0

  config.train.global_batch_size = 32
  config.train.num_epochs = 50  # 330 steps per epoch on train_aug
  # --mode=eval and --mode=export: the paper's multi-scale + flip + CRF protocol (the training
  # run's own evaluation is single-scale).
  config.eval.protocol = "paper"
  config.export.protocol = "paper"

  if variant == "smoke":
    config.model.backbone = "tiny"
    config.model.output_stride = 16
    config.model.decoder_channels = 16
    config.model.low_level_channels = 8
    config.model.aspp_dilations = (1, 2, 3)
    config.data.crop_size = 64
    config.data.resize_range = (48, 80)
    config.train.global_batch_size = 8
    config.train.num_epochs = 2
    config.train.max_steps_per_epoch = 2
    config.train.checkpoint_every = 2
  return config
