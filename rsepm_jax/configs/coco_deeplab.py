r"""MS COCO 2014: the multi-stage pipeline's DeepLabv3+ trained on pseudo labels (spec 9).

Stage 1 writes pseudo labels of train2014 with a trained RS+EPM network (configs/coco.py,
`--mode=export --config.export.protocol=paper`: `<workdir>/pseudo_labels/train2014/<id>.png`);
this config trains DeepLabv3+ fully supervised on them and evaluates it on val2014:

  python -m rsepm_jax.main --config=configs/coco_deeplab.py \
      --config.data.root=/data/coco2014 \
      --config.data.train_mask_dir=/ckpt/rsepm_coco/pseudo_labels/train2014 \
      --config.model.init_from=/weights/resnet101.pth --workdir=/ckpt/deeplab_coco

or the whole chain with `python -m rsepm_jax.pipeline --config=configs/coco.py
--seg_config=configs/coco_deeplab.py ...`. The authors released a COCO DeepLabv3+ ResNet-101 but
not its recipe: this is configs/voc_deeplab.py's (batch 32, LR 0.007 with groups 1 / 2 / 10 /
20, weight decay 4e-5, Nesterov, 512 crops) for 6 epochs (about 15,400 steps), our choice.

Variants (`--config=configs/coco_deeplab.py:VARIANT`): (none) DeepLabv3+ ResNet-101, output
stride 8; smoke a tiny ResNet on 64 px crops, 2 epochs of 2 steps. Every knob is described in
rsepm_jax/configs/demo.py.
"""
from rsepm_jax.configs import coco
from rsepm_jax.configs import voc_deeplab


def get_config(arg=None):
  """Returns the config; `arg` selects a variant ("smoke")."""
  variant = arg or ""
  if variant not in ("", "smoke"):
    raise ValueError(f"configs/coco_deeplab.py: unknown variant {arg!r}; expected one of: '', "
                     "'smoke'.")
  config = voc_deeplab.get_config(variant)
  config.data = coco.get_config(variant).data
  config.data.train_mask_dir = ""  # the pseudo labels of train2014 (see the docstring)
  config.data.resize_range = voc_deeplab.get_config(variant).data.resize_range
  config.data.crop_size = voc_deeplab.get_config(variant).data.crop_size
  config.export.split = "train2014"
  if variant != "smoke":
    config.train.num_epochs = 6  # 2,565 steps per epoch at batch 32
    config.train.checkpoint_every = 2000
  return config
