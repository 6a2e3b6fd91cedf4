r"""PASCAL VOC 2012 + SBD (train_aug): ResNet-50, the paper's settings (spec 7).

  python -m rsepm_jax.main --config=configs/voc.py \
      --config.data.root=/data/VOCdevkit/VOC2012 --workdir=/ckpt/rsepm_voc

On a TPU pod or several GPU hosts see launch/; e.g. with ArrayRecord data in a bucket:

  python -m rsepm_jax.main --config=configs/voc.py --config.data.name=array_record \
      --config.data.root=gs://BUCKET/tfds --workdir=gs://BUCKET/rsepm_voc

Variants (`--config=configs/voc.py:VARIANT`):
  (none)  ResNet-50, OS16, 512 crops, global batch 16, 30 epochs (spec 6.3, 7.2 suggestions).
  r101    ResNet-101.
  smoke   the same readers, a tiny ResNet on 64 px crops, 2 workers: 3 epochs, CAM only, then
          RecurSeed, then EdgePredictMix, then the evaluation; for checking a data set-up on a
          few images (a full VOC epoch is 1,322 steps at this batch).

ImageNet weights: `--config.model.init_from=/weights/resnet50.pth` (or a .safetensors; see
`python -m rsepm_jax.models.convert`). Every knob is described in rsepm_jax/configs/demo.py.
"""
from rsepm_jax.configs import demo


def get_config(arg=None):
  """Returns the config; `arg` selects a variant ("r101", "smoke")."""
  variant = arg or ""
  if variant not in ("", "r101", "smoke"):
    raise ValueError(f"configs/voc.py: unknown variant {arg!r}; expected one of: '', 'r101', 'smoke'.")
  config = demo.get_config()

  config.data.name = "voc"
  config.data.root = ""  # the VOC2012 folder: JPEGImages, Annotations, ImageSets, masks
  config.data.train_split = "train_aug"  # 10,582 images (VOC train + SBD)
  config.data.eval_split = "val"  # 1,449 images; pseudo-label quality is reported on "train"
  config.data.num_classes = 20
  config.data.mask_dir = "SegmentationClassAug"
  config.data.crop_size = 512
  config.data.resize_range = (320, 640)
  config.data.eval_size = 512  # VOC images are at most 500 x 500
  config.data.num_workers = 8
  config.data.read_threads = 8
  config.data.prefetch_buffer_size = 64
  config.data.dataset = "voc"  # the ArrayRecord dataset name (data.name = "array_record")

  config.model.backbone = "resnet50"
  config.model.output_stride = 16
  config.model.decoder_channels = 256
  config.model.low_level_channels = 256
  config.model.aspp_dilations = ()  # spec (6, 12, 18) at OS16
  config.model.dtype = "bfloat16"
  config.model.init_from = ""  # torchvision ImageNet weights; strongly recommended

  config.optim.lr = 0.1
  config.optim.lr_backbone_weight = 1.0  # spec 7.1 groups for an ImageNet backbone
  config.optim.lr_backbone_bias = 2.0
  config.optim.lr_new_weight = 10.0
  config.optim.lr_new_bias = 20.0
  config.optim.ema_ramp_steps = 2000

  config.train.global_batch_size = 16
  config.train.num_epochs = 30
  config.train.log_every = 50
  config.train.checkpoint_every = 1000
  config.train.max_checkpoints = 3
  config.train.eval_every = 0

  config.loss.rs_start_epoch = 5
  config.loss.decoder_source_epoch = 10
  config.loss.mix_start_epoch = 15

  config.recurseed.pamr_dilations = (1, 2, 4, 8, 12, 24)
  config.mix.kind = "epm"

  config.eval.global_batch_size = 16
  # The split WSSS pipelines train their segmentation network on: pseudo labels of train_aug.
  config.export.split = "train_aug"

  if variant == "r101":
    config.model.backbone = "resnet101"
  if variant == "smoke":
    # eval_size stays 512: the readers and the padding of full-size VOC images are exercised.
    config.data.crop_size = 64
    config.data.resize_range = (48, 80)
    config.data.num_workers = 2
    config.data.read_threads = 2
    config.data.prefetch_buffer_size = 16
    config.model.backbone = "tiny"
    config.model.decoder_channels = 16
    config.model.low_level_channels = 16
    config.model.aspp_dilations = (1, 2, 3)
    config.model.dtype = "float32"
    config.train.global_batch_size = 8
    # One phase per epoch: CAM only, + RecurSeed, + mixing, 2 steps each (also on a full data
    # set); every step is logged, a checkpoint is written after the RecurSeed epoch.
    config.train.num_epochs = 3
    config.train.max_steps_per_epoch = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 4
    config.loss.rs_start_epoch = 1
    config.loss.mix_start_epoch = 2
    # A fresh decoder's softmax falls between the confidence thresholds, so as the source it
    # would leave every seed ignored (tests/test_phases.py covers the switch).
    config.loss.decoder_source_epoch = 99  # never
    config.recurseed.pamr_dilations = (1, 2)
    config.eval.global_batch_size = 8
  return config
