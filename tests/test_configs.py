"""configs/voc.py and configs/coco.py: same knobs as demo.py, and they read real data layouts."""
import numpy as np
import pytest

from rsepm_jax.configs import coco
from rsepm_jax.configs import demo
from rsepm_jax.configs import voc
from rsepm_jax.data import pipeline
from tests import test_voc


def _keys(config, prefix=""):
  keys = set()
  for name, value in config.items():
    if hasattr(value, "items"):
      keys |= _keys(value, f"{prefix}{name}.")
    else:
      keys.add(f"{prefix}{name}")
  return keys


@pytest.mark.parametrize("module,variants", [(voc, ("", "r101", "smoke")), (coco, ("", "r101", "smoke"))])
def test_every_variant_has_exactly_the_demo_knobs(module, variants):
  demo_keys = _keys(demo.get_config())
  for variant in variants:
    assert _keys(module.get_config(variant)) == demo_keys


def test_paper_settings():
  config = voc.get_config()
  assert (config.data.train_split, config.data.num_classes, config.data.crop_size) == ("train_aug", 20, 512)
  assert tuple(config.data.resize_range) == (320, 640)
  assert config.model.backbone == "resnet50" and config.model.output_stride == 16
  assert (config.loss.rs_start_epoch, config.loss.mix_start_epoch) == (5, 15)
  assert coco.get_config().data.num_classes == 80
  assert voc.get_config("r101").model.backbone == "resnet101"


@pytest.mark.parametrize("module", [voc, coco, demo])
def test_unknown_variant_is_a_clear_error(module):
  with pytest.raises(ValueError, match="unknown variant 'typo'"):
    module.get_config("typo")


def test_voc_smoke_config_reads_a_vocdevkit_through_the_train_pipeline(tmp_path):
  records_by_id = {f"2007_{i:06d}": (test_voc._smooth_image(i), test_voc._mask_with_border(i % 20 + 1),
                                     None) for i in range(8)}
  test_voc._make_vocdevkit(tmp_path, records_by_id, split="train_aug", mask_dir="SegmentationClassAug")
  config = voc.get_config("smoke")
  config.data.root = str(tmp_path)
  config.data.allow_subset = True  # 8 images, not 10,582
  config.data.num_workers = 0
  batch = next(pipeline.train_iterator(config.data, config.train.global_batch_size, seed=0))
  size = config.data.crop_size
  assert batch["image"].shape == (8, size, size, 3) and batch["image"].dtype == np.uint8
  assert batch["labels"].shape == (8, 20)
  # Tags come from the masks (no XML here): one class per image, each class of the fake set.
  assert np.all(batch["labels"].sum(axis=1) == 1)
  present = set(np.unique(batch["mask"])) - {0, 255}
  assert present and present <= {int(c) + 1 for c in np.nonzero(batch["labels"])[1]}
