"""configs/voc.py and configs/coco.py: same knobs as demo.py, smoke variants that run every
phase, the real data layouts, and class names in the results."""
import json
import logging

import numpy as np
import pytest

from rsepm_jax import evaluate
from rsepm_jax import metrics
from rsepm_jax import train_step
from rsepm_jax.configs import coco
from rsepm_jax.configs import coco_deeplab
from rsepm_jax.configs import demo
from rsepm_jax.configs import puzzlecam_voc
from rsepm_jax.configs import voc
from rsepm_jax.configs import voc_deeplab
from rsepm_jax.configs import voc_rw
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


@pytest.mark.parametrize("module,variants", [(voc, ("", "r101", "smoke")),
                                             (coco, ("", "r101", "smoke")),
                                             (voc_deeplab, ("", "smoke")),
                                             (voc_rw, ("", "smoke")),
                                             (coco_deeplab, ("", "smoke")),
                                             (puzzlecam_voc, ("", "resnet50", "smoke"))])
def test_every_variant_has_exactly_the_demo_knobs(module, variants):
  demo_keys = _keys(demo.get_config())
  for variant in variants:
    assert _keys(module.get_config(variant)) == demo_keys


@pytest.mark.parametrize("module", [voc, coco, demo])
def test_smoke_schedule_switches_every_phase_on(module):
  config = module.get_config("smoke")
  loss = config.loss
  phases = [(bool(epoch >= loss.rs_start_epoch), bool(train_step.mix_phase_on(epoch, loss)))
            for epoch in range(config.train.num_epochs)]
  assert phases[0] == (False, False)  # CAM only
  assert phases[-1] == (True, True)  # RecurSeed and mixing
  if module is not demo:  # the demo's smoke (what the tests run) starts both at once
    assert phases == [(False, False), (True, False), (True, True)]
    assert config.data.num_workers == 2


def test_paper_settings():
  config = voc.get_config()
  assert (config.data.train_split, config.data.num_classes, config.data.crop_size) == ("train_aug", 20, 512)
  assert tuple(config.data.resize_range) == (320, 640)
  assert config.model.backbone == "resnet50" and config.model.output_stride == 16
  assert (config.loss.rs_start_epoch, config.loss.mix_start_epoch) == (5, 15)
  assert coco.get_config().data.num_classes == 80
  assert voc.get_config("r101").model.backbone == "resnet101"
  assert voc.get_config().export.split == "train_aug"
  assert coco.get_config().export.split == coco.get_config().data.train_split == "train2014"
  assert coco.get_config("smoke").data.eval_size == 640  # COCO images are up to 640 px


def _array_record(module):
  config = module.get_config()
  config.data.name = "array_record"
  return config


@pytest.mark.parametrize("make_config,names", [
    (voc.get_config, ("aeroplane", "bicycle", "bird", "tvmonitor", 20)),
    (lambda: _array_record(voc), ("aeroplane", "bicycle", "bird", "tvmonitor", 20)),
    (coco.get_config, ("person", "bicycle", "car", "toothbrush", 80)),
    (lambda: _array_record(coco), ("person", "bicycle", "car", "toothbrush", 80)),
    (demo.get_config, ("disc", "square", "triangle", "cross", 6)),
])
def test_results_name_the_classes(make_config, names, tmp_path, caplog):
  config = make_config()
  *first_three, last, num_classes = names
  expected = evaluate.class_names(config)
  assert (len(expected), expected[:4], expected[-1]) == (
      num_classes + 1, ("background", *first_three), last)
  confusion = np.random.default_rng(0).integers(0, 50, (num_classes + 1,) * 2)
  scores = metrics.segmentation_scores(confusion)
  results = {"split": "val", "num_images": 3, "cam": {**scores, "threshold": 0.3},
             "decoder": scores, "all_background_miou": 0.1}
  with caplog.at_level(logging.INFO):
    evaluate.report(results, config, str(tmp_path), step=7)
  assert f"\n{last} " in caplog.text and "class_1" not in caplog.text
  saved = json.loads((tmp_path / "eval" / "step_7.json").read_text())
  assert saved["class_names"] == list(expected)
  assert len(saved["decoder"]["iou"]) == num_classes + 1


def test_deeplab_recipe():
  """Spec 9: DeepLabv3+ R101 OS8, low-level 48; PuzzleCAM's recipe (spec 7.2)."""
  config = voc_deeplab.get_config()
  model, optim, data = config.model, config.optim, config.data
  assert (model.arch, model.backbone, model.output_stride, model.low_level_channels) == (
      "deeplabv3plus", "resnet101", 8, 48)
  assert (config.train.global_batch_size, config.train.num_epochs) == (32, 50)
  assert (optim.lr, optim.weight_decay, optim.nesterov, optim.poly_power) == (
      0.007, 4e-5, True, 0.9)
  assert (optim.lr_backbone_weight, optim.lr_backbone_bias, optim.lr_new_weight,
          optim.lr_new_bias) == (1.0, 2.0, 10.0, 20.0)
  assert (tuple(data.resize_range), data.crop_size, data.train_split) == ((256, 1024), 512,
                                                                           "train_aug")
  assert (config.eval.protocol, config.export.protocol) == ("paper", "paper")


def test_class_count_mismatch_names_the_key():
  config = voc.get_config()
  config.data.num_classes = 21
  with pytest.raises(ValueError, match=r"config\.data\.num_classes=21.*'voc' has 20 classes"):
    evaluate.class_names(config)


@pytest.mark.parametrize("module", [voc, coco, demo, voc_deeplab, voc_rw, coco_deeplab,
                                    puzzlecam_voc])
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
