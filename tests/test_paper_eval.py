"""config.eval.protocol="paper": the streamed confusion matrix against per-image labels computed
here from inference / CRF calls and np.histogram2d; padding excluded; --mode=eval end to end."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rsepm_jax import config_check
from rsepm_jax import inference
from rsepm_jax import paper_eval
from rsepm_jax.configs import demo
from rsepm_jax.data import pipeline
from rsepm_jax.data import synthetic
from rsepm_jax.refine import crf
from tests import test_inference

SIZE = 32  # the records' padded side
IMAGE_SIZES = ((20, 28), (32, 24), (16, 32))  # (height, width) of the valid records


def records(image_sizes=IMAGE_SIZES):
  """One batch of images of `image_sizes` padded to SIZE, then an invalid record holding a real
  image and mask (it must not be counted), as `pipeline.eval_batches` yields; and the crops."""
  rng = np.random.RandomState(0)
  n = len(image_sizes) + 1
  batch = {"image": np.zeros((n, SIZE, SIZE, 3), np.uint8),
           "mask": np.full((n, SIZE, SIZE), 255, np.uint8),
           "labels": np.zeros((n, test_inference.NUM_CLASSES), np.float32),
           "crop_box": np.zeros((n, 4), np.int32), "valid": np.arange(n) < n - 1}
  crops = []
  for i, (h, w) in enumerate(tuple(image_sizes) + ((SIZE, SIZE),)):
    image = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
    mask = rng.randint(0, test_inference.NUM_CLASSES + 1, (h, w)).astype(np.uint8)
    mask[rng.rand(h, w) < 0.1] = 255
    batch["image"][i, :h, :w], batch["mask"][i, :h, :w] = image, mask
    batch["labels"][i] = [1, 0, 1] if i % 2 else [0, 1, 0]
    batch["crop_box"][i] = (0, 0, h, w)
    crops.append((image, mask, batch["labels"][i] > 0))
  return batch, crops[:-1]


def expected_confusion(crops, config):
  """Spec 8.1 per image (multiscale, gating, background, CRF over the kept labels, argmax),
  counted with np.histogram2d over the pixels whose GT is not 255."""
  model, variables = test_inference.StubNet(), test_inference.stub_variables()
  num_labels = test_inference.NUM_CLASSES + 1
  total = np.zeros((num_labels, num_labels), np.int64)
  for image, mask, tags in crops:
    scores = inference.multiscale(model, variables, image, config.inference.scales)
    result = inference.segment(scores["pred_mask"], scores["pred_class"],
                               tags=tags if config.eval.gate_by_tags else None,
                               conf_th=config.inference.conf_th)
    label = result["label"]
    if config.eval.crf:
      kept = [0] + [k + 1 for k in result["keys"]]
      refined = np.asarray(jax.jit(crf.dense_crf)(image, result["probs"][..., kept]))
      label = np.array(kept)[refined.argmax(-1)]
    counted = mask != 255
    total += np.histogram2d(mask[counted], label[counted], bins=num_labels,
                            range=((0, num_labels), (0, num_labels)))[0].astype(np.int64)
  return total


@pytest.mark.parametrize("crf_on, gate_by_tags", [(True, False), (False, True)])
def test_streamed_confusion_matches_per_image_labels(crf_on, gate_by_tags):
  config = demo.get_config("smoke")
  config.data.num_classes = test_inference.NUM_CLASSES
  config.inference.scales = (1.0, 0.5)
  config.inference.conf_th = 0.5
  config.eval.crf, config.eval.gate_by_tags = crf_on, gate_by_tags
  batch, crops = records()
  counts = paper_eval.stream_confusion(
      test_inference.StubNet(), test_inference.stub_variables(), config, [batch])
  confusion = counts["paper"]
  assert counts["num_images"] == 3 and "seeds" not in counts
  expected = expected_confusion(crops, config)
  assert expected.sum() == sum(int((m != 255).sum()) for _, m, _ in crops)  # padding not counted
  np.testing.assert_array_equal(confusion, expected)
  assert confusion.dtype == np.int64


def test_seed_sweep_counts_each_background_threshold_by_hand():
  """The seeds (NumPy multi-scale reference, foreground / its max, GT tags only) against a
  constant background th: argmax([th, seeds]) per pixel, counted with np.histogram2d."""
  config = demo.get_config("smoke")
  config.data.num_classes = test_inference.NUM_CLASSES
  config.inference.scales = (1.0, 0.5)
  config.eval.crf, config.eval.seed_sweep = False, True
  config.eval.cam_threshold_min, config.eval.cam_threshold_max = 0.2, 0.6
  config.eval.cam_threshold_step = 0.2
  batch, crops = records()
  variables = test_inference.stub_variables()
  counts = paper_eval.stream_confusion(test_inference.StubNet(), variables, config, [batch])
  num_labels = test_inference.NUM_CLASSES + 1
  expected = np.zeros((3, num_labels, num_labels), np.int64)
  for image, mask, tags in crops:
    foreground = test_inference.reference(image, variables, (1.0, 0.5), True)["pred_mask"][..., 1:]
    seeds = foreground / (foreground.max(axis=(0, 1)) + 1e-5) * tags
    for t, threshold in enumerate((0.2, 0.4, 0.6)):
      label = np.argmax(np.concatenate([np.full(mask.shape + (1,), threshold), seeds], -1), -1)
      counted = mask != 255
      expected[t] += np.histogram2d(mask[counted], label[counted], bins=num_labels,
                                    range=((0, num_labels), (0, num_labels)))[0].astype(np.int64)
  assert len({int(c.trace()) for c in expected}) > 1  # the thresholds give different labels
  np.testing.assert_array_equal(counts["seeds"], expected)


def test_sum_over_hosts_keeps_int64_counts():
  counts = np.array([[3, (1 << 40) + 7], [(1 << 31) - 1, 1 << 31]], np.int64)
  np.testing.assert_array_equal(paper_eval.sum_over_hosts(counts), counts)  # one process


def test_an_unknown_protocol_is_refused():
  config = demo.get_config("smoke")
  config.eval.protocol = "papr"
  with pytest.raises(config_check.ConfigError,
                     match=r"config.eval.protocol='papr': expected one of \('single', 'paper'\)"):
    config_check.validate(config)


def test_eval_paper_protocol_from_the_command_line(tmp_path, save_untrained_checkpoint):
  config = demo.get_config("smoke")
  workdir = tmp_path / "work"
  save_untrained_checkpoint(config, workdir, 2)

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="/tmp/jax_cache")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "rsepm_jax.main", "--config=configs/demo.py:smoke", "--mode=eval",
       f"--workdir={workdir}", "--config.eval.protocol=paper", "--config.inference.scales=(1.0,)",
       "--config.eval.seed_sweep=True",
       "--config.inference.hflip=False"],
      capture_output=True, text=True, timeout=300, env=env, cwd=root)
  assert result.returncode == 0, result.stderr[-3000:]
  num_eval = config.data.synthetic.num_eval
  assert f"paper eval val: {num_eval}/{num_eval} images" in result.stderr
  results = json.loads((workdir / "eval" / "step_2_paper.json").read_text())
  assert results["num_images"] == num_eval and results["split"] == "val"
  assert results["class_names"] == ["background"] + list(
      synthetic.CLASS_NAMES[:config.data.num_classes])
  assert len(results["paper"]["iou"]) == config.data.num_classes + 1
  assert 0 <= results["paper"]["miou"] <= 1
  assert "paper mIoU on val at step 2" in result.stderr
  seeds = results["seeds"]  # the background sweep: 0.10 ... 0.80, the best one reported
  assert len(seeds["per_threshold"]) == 15 and seeds["threshold"] in [
      row["threshold"] for row in seeds["per_threshold"]]
  assert seeds["miou"] == max(row["miou"] for row in seeds["per_threshold"])
