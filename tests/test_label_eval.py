"""Scoring a folder of label PNGs against the ground truth (python -m rsepm_jax.label_eval)."""
from etils import epath
import numpy as np
import pytest

from rsepm_jax import label_eval
from rsepm_jax import visualize
from rsepm_jax.configs import demo
from rsepm_jax.data import synthetic


def _config():
  config = demo.get_config("smoke")
  config.data.synthetic.num_train = 5
  config.eval.global_batch_size = 2  # three batches, the last one padded
  return config


def _ground_truth(config):
  source = synthetic.from_config(config.data, "train")
  return {source[i]["id"]: np.asarray(source[i]["mask"]) for i in range(len(source))}


def test_scores_equal_a_numpy_count_with_unsure_pixels_left_out(tmp_path):
  config = _config()
  truth = _ground_truth(config)
  ids = sorted(truth)
  labels = {name: np.where(gt == 255, 0, gt).astype(np.uint8) for name, gt in truth.items()}
  labels[ids[0]][:] = 255  # all unsure: image 0 counts nothing
  labels[ids[1]][:8, :8] = 1  # a block of class 0 (label 1): errors where the GT differs
  for name, label in labels.items():
    visualize.save_png(label, epath.Path(tmp_path) / f"{name}.png")

  results = label_eval.score_folder(config, str(tmp_path), "train")

  num_labels = config.data.num_classes + 1
  confusion = np.zeros((num_labels, num_labels), np.int64)
  for name in ids[1:]:
    gt, label = truth[name].ravel(), labels[name].ravel()
    keep = gt != 255
    np.add.at(confusion, (gt[keep], label[keep]), 1)
  union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
  with np.errstate(invalid="ignore"):
    iou = np.diag(confusion) / union
  assert results["num_images"] == 5
  np.testing.assert_allclose(results["labels"]["iou"], iou, rtol=1e-12)
  assert results["labels"]["miou"] == pytest.approx(np.nanmean(iou))
  counted = {name: int(np.sum(gt != 255)) for name, gt in truth.items()}
  assert results["ignored_fraction"] == pytest.approx(counted[ids[0]] / sum(counted.values()))
  assert results["labels"]["miou"] < 1.0 and iou[0] < 1.0


def test_missing_and_mis_sized_files_are_named(tmp_path):
  config = _config()
  truth = _ground_truth(config)
  ids = sorted(truth)
  for name in ids[:3]:
    visualize.save_png(np.zeros_like(truth[name], np.uint8), epath.Path(tmp_path) / f"{name}.png")
  with pytest.raises(label_eval.LabelFolderError, match=f"2 label PNGs missing in .*{ids[3]}.png"):
    label_eval.score_folder(config, str(tmp_path), "train")
  for name in ids[3:]:
    visualize.save_png(np.zeros((4, 4), np.uint8), epath.Path(tmp_path) / f"{name}.png")
  with pytest.raises(label_eval.LabelFolderError, match=f"{ids[3]}.png: a \\(4, 4\\) label map"):
    label_eval.score_folder(config, str(tmp_path), "train")
  with pytest.raises(label_eval.LabelFolderError, match="no such folder"):
    label_eval.score_folder(config, str(tmp_path / "nothing"), "train")
