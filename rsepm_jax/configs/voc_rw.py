r"""PASCAL VOC 2012: the boundary network of the multi-stage pipeline's random walk (spec 9).

IRNet's edge branch (`model.arch="affinity"`: a frozen ImageNet ResNet with fixed BN, five
conv + GroupNorm branches, one edge logit at stride 4) trained with IRNet's affinity loss on the
confident labels of the single-stage network (`--mode=export --config.export.protocol=confident`
of configs/voc.py writes `<workdir>/confident_labels/train_aug/<id>.png`):

  python -m rsepm_jax.main --config=configs/voc_rw.py \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.train_mask_dir=/ckpt/rsepm_voc/confident_labels/train_aug \
      --config.model.init_from=/weights/resnet50.pth --workdir=/ckpt/affinity_voc

`python -m rsepm_jax.pipeline` runs this between the export and the DeepLab training.

Variants (`--config=configs/voc_rw.py:VARIANT`):
  (none)  IRNet's recipe (components spec D.2): ResNet-50, global batch 32, 3 epochs, LR 0.1 on
          the edge layers only (the backbone's multipliers are 0), weight decay 1e-4, long side
          U{320..640} (Puzzle-CAM), 512 crops, flips, no EMA; pair radius 10.
  smoke   a tiny ResNet on 64 px crops, 2 epochs of 2 steps.
Every knob is described in rsepm_jax/configs/demo.py.
"""
from rsepm_jax.configs import voc


def get_config(arg=None):
  """Returns the config; `arg` selects a variant ("smoke")."""
  variant = arg or ""
  if variant not in ("", "smoke"):
    raise ValueError(f"configs/voc_rw.py: unknown variant {arg!r}; expected one of: '', 'smoke'.")
  config = voc.get_config(variant)
  config.model.arch = "affinity"
  config.model.backbone = "resnet50"
  config.model.output_stride = 16
  config.model.last_stride = 1
  config.model.dtype = "float32"
  config.data.train_mask_dir = ""  # the confident labels of train_aug (see the docstring)
  config.data.resize_range = (320, 640)
  config.data.crop_size = 512

  config.optim.lr = 0.1
  config.optim.weight_decay = 1e-4
  config.optim.nesterov = False
  config.optim.lr_backbone_weight = 0.0  # frozen (and detached in the network)
  config.optim.lr_backbone_bias = 0.0
  config.optim.lr_new_weight = 1.0
  config.optim.lr_new_bias = 1.0
  config.optim.ema_decay = 0.0  # IRNet keeps no average
  config.eval.use_ema = False

  config.train.global_batch_size = 32
  config.train.num_epochs = 3
  config.train.eval_every = 0
  config.affinity.radius = 10

  if variant == "smoke":
    config.model.backbone = "tiny"
    config.data.crop_size = 64
    config.data.resize_range = (48, 80)
    config.train.global_batch_size = 8
    config.train.num_epochs = 2
    config.train.max_steps_per_epoch = 2
    config.train.checkpoint_every = 2
    config.affinity.radius = 3
  return config
