r"""MS COCO 2014: ResNet-50, the paper's settings (spec 7) on 80 classes.

Masks are made once from the instances JSON (needs pycocotools):

  python -m rsepm_jax.data.prepare_coco --root=/data/coco2014 --split=train2014
  python -m rsepm_jax.data.prepare_coco --root=/data/coco2014 --split=val2014
  python -m rsepm_jax.main --config=configs/coco.py \
      --config.data.root=/data/coco2014 --workdir=/ckpt/rsepm_coco

Variants (`--config=configs/coco.py:VARIANT`): (none) ResNet-50; r101 ResNet-101; smoke the
COCO reader with a tiny ResNet on 64 px crops and 2 workers, 3 epochs (CAM only, + RecurSeed,
+ EdgePredictMix) then the evaluation, for checking a data set-up on a few images (as voc.py's).
Every knob is described in rsepm_jax/configs/demo.py.
"""
from rsepm_jax.configs import voc


def get_config(arg=None):
  """Returns the config; `arg` selects a variant ("r101", "smoke")."""
  variant = arg or ""
  if variant not in ("", "r101", "smoke"):
    raise ValueError(f"configs/coco.py: unknown variant {arg!r}; expected one of: '', 'r101', 'smoke'.")
  config = voc.get_config(variant)
  config.data.name = "coco"
  config.data.root = ""  # holds train2014/, val2014/ and masks/{train2014,val2014}/*.png
  config.data.train_split = "train2014"  # 82,081 images with annotations
  config.data.eval_split = "val2014"  # 40,137 images with annotations
  config.data.num_classes = 80
  config.data.mask_dir = "masks"
  config.data.dataset = "coco"
  config.data.eval_size = 640  # COCO images are at most 640 x 640
  config.export.split = "train2014"  # pseudo labels for the segmentation network's training
  if variant != "smoke":
    config.train.num_epochs = 10  # 5,130 steps per epoch at batch 16
    config.train.checkpoint_every = 2000
    config.loss.rs_start_epoch = 2
    config.loss.decoder_source_epoch = 4
    config.loss.mix_start_epoch = 5
  return config
