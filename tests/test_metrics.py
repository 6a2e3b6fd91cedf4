"""Tests for rsepm_jax.metrics: a hand-computed example plus naive numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax import metrics
from rsepm_jax import parallel

NUM_CLASSES = 4  # background + 3 foreground classes; class 3 never appears in the example.

# Hand-computed example, rows ground truth, columns prediction.
HAND_GT = np.array([
    [0, 0, 1, 1],
    [0, 0, 1, 1],
    [2, 2, 255, 255],
    [2, 2, 0, 0],
], np.uint8)
# The two ignored pixels predict 3 and 1: if they were counted, class 3 would be present.
HAND_PRED = np.array([
    [0, 1, 1, 1],
    [0, 0, 0, 1],
    [2, 0, 3, 1],
    [2, 2, 0, 1],
], np.int32)
# gt 0 (6 px): pred 0 at (0,0) (1,0) (1,1) (3,2); pred 1 at (0,1) (3,3)        -> [4, 2, 0, 0]
# gt 1 (4 px): pred 0 at (1,2); pred 1 at (0,2) (0,3) (1,3)                    -> [1, 3, 0, 0]
# gt 2 (4 px): pred 0 at (2,1); pred 2 at (2,0) (3,0) (3,1)                    -> [1, 0, 3, 0]
# gt 3: none                                                                   -> [0, 0, 0, 0]
HAND_CONFUSION = np.array([
    [4, 2, 0, 0],
    [1, 3, 0, 0],
    [1, 0, 3, 0],
    [0, 0, 0, 0],
])
# T (row sums) = 6, 4, 4, 0; P (column sums) = 6, 5, 3, 0; TP = 4, 3, 3, 0.
# union = T + P - TP = 8, 6, 4, 0.
# IoU = 4/8, 3/6, 3/4, NaN       -> mIoU = (0.5 + 0.5 + 0.75) / 3 = 0.58333...
# FP  = 2/8, 2/6, 0/4, NaN       -> fg mean (classes 1, 2) = (1/3 + 0) / 2 = 1/6
# FN  = 2/8, 1/6, 1/4, NaN       -> fg mean (classes 1, 2) = (1/6 + 1/4) / 2 = 5/24
HAND_IOU = [0.5, 0.5, 0.75, np.nan]
HAND_FP = [0.25, 1 / 3, 0.0, np.nan]
HAND_FN = [0.25, 1 / 6, 0.25, np.nan]
HAND_MIOU = 1.75 / 3
HAND_MEAN_FP = 1 / 6
HAND_MEAN_FN = 5 / 24

# Shared shapes so each jitted function compiles once.
BATCH, HEIGHT, WIDTH, NUM_FG = 4, 16, 16, 3

jit_confusion = jax.jit(metrics.confusion_matrix, static_argnames=("num_classes", "ignore_index"))
jit_sweep = jax.jit(
    metrics.threshold_sweep_confusions, static_argnames=("num_classes", "ignore_index"))


def naive_confusion(pred, gt, num_classes, ignore_index=255, valid=None):
  """Pixel-by-pixel loop."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  valid = np.ones(gt.shape, bool) if valid is None else valid
  for p, g, v in zip(pred.ravel(), gt.ravel(), valid.ravel()):
    if v and g != ignore_index:
      counts[g, p] += 1
  return counts


def naive_threshold_predictions(scores, labels, threshold):
  """Per image: keys = [0] + present classes + 1; argmax over [th, present class maps]."""
  predictions = []
  for image_scores, image_labels in zip(scores, labels):
    present = np.flatnonzero(image_labels > 0)
    keys = np.concatenate([[0], present + 1])
    background = np.full(image_scores.shape[:2] + (1,), threshold, np.float32)
    stacked = np.concatenate([background, image_scores[..., present]], axis=-1)
    predictions.append(keys[np.argmax(stacked, axis=-1)])
  return np.stack(predictions)


def random_case(seed):
  """Scores quantised to 0.05 steps (so they tie with the thresholds), labels, gt with 255s."""
  rng = np.random.default_rng(seed)
  scores = (rng.integers(0, 21, (BATCH, HEIGHT, WIDTH, NUM_FG)) * 0.05).astype(np.float32)
  labels = (rng.random((BATCH, NUM_FG)) < 0.6).astype(np.float32)
  labels[0] = 0  # one image without labels: all background.
  gt = rng.integers(0, NUM_FG + 1, (BATCH, HEIGHT, WIDTH)).astype(np.int32)
  gt[rng.random(gt.shape) < 0.1] = 255
  return scores, labels, gt


def test_hand_example_confusion():
  confusion = metrics.confusion_matrix(HAND_PRED, HAND_GT, NUM_CLASSES)
  assert confusion.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(confusion), HAND_CONFUSION)


def test_hand_example_scores():
  scores = metrics.segmentation_scores(HAND_CONFUSION)
  np.testing.assert_allclose(scores["iou"], HAND_IOU)
  np.testing.assert_allclose(scores["fp_per_class"], HAND_FP)
  np.testing.assert_allclose(scores["fn_per_class"], HAND_FN)
  assert scores["miou"] == pytest.approx(HAND_MIOU)
  assert scores["fp"] == pytest.approx(HAND_MEAN_FP)
  assert scores["fn"] == pytest.approx(HAND_MEAN_FN)


def test_iou_fp_fn_sum_to_one_per_present_class():
  rng = np.random.default_rng(0)
  confusion = rng.integers(0, 50, (6, 6))
  confusion[4, :] = 0
  confusion[:, 4] = 0  # class 4 absent from both: NaN everywhere, not 1.
  scores = metrics.segmentation_scores(confusion)
  total = scores["iou"] + scores["fp_per_class"] + scores["fn_per_class"]
  present = np.arange(6) != 4
  np.testing.assert_allclose(total[present], 1.0)
  assert np.isnan(total[4])
  assert scores["miou"] == pytest.approx(np.mean(scores["iou"][present]))
  assert scores["fp"] == pytest.approx(np.mean(scores["fp_per_class"][[1, 2, 3, 5]]))


def test_scores_all_absent_are_nan_without_warning():
  with np.errstate(all="raise"):
    scores = metrics.segmentation_scores(np.zeros((3, 3), np.int64))
  assert np.isnan(scores["miou"]) and np.isnan(scores["fp"]) and np.isnan(scores["fn"])


def test_confusion_matches_naive_eager_and_jit():
  _, _, gt = random_case(1)
  rng = np.random.default_rng(2)
  pred = rng.integers(0, NUM_CLASSES, gt.shape).astype(np.int32)
  expected = naive_confusion(pred, gt, NUM_CLASSES)
  eager = metrics.confusion_matrix(pred, gt, NUM_CLASSES)
  jitted = jit_confusion(jnp.asarray(pred), jnp.asarray(gt), num_classes=NUM_CLASSES)
  np.testing.assert_array_equal(np.asarray(eager), expected)
  np.testing.assert_array_equal(np.asarray(jitted), expected)
  np.testing.assert_allclose(metrics.segmentation_scores(jitted)["iou"],
                             metrics.segmentation_scores(expected)["iou"])


def test_confusion_valid_mask_drops_padded_images():
  _, _, gt = random_case(3)
  rng = np.random.default_rng(4)
  pred = rng.integers(0, NUM_CLASSES, gt.shape).astype(np.int32)
  valid = np.ones(gt.shape, bool)
  valid[-1] = False  # a padded batch entry.
  valid[0, :3] = False  # and a few extra pixels.
  got = jit_confusion(pred, gt, num_classes=NUM_CLASSES, valid=valid)
  expected = naive_confusion(pred, gt, NUM_CLASSES, valid=valid)
  np.testing.assert_array_equal(np.asarray(got), expected)
  assert int(got.sum()) == int(np.sum(valid & (gt != 255)))


def test_confusion_on_sharded_batch():
  sharding = parallel.batch_sharded(parallel.make_mesh())
  rng = np.random.default_rng(5)
  gt = rng.integers(0, NUM_CLASSES, (8, 4, 4)).astype(np.int32)
  gt[:, 0] = 255
  pred = rng.integers(0, NUM_CLASSES, gt.shape).astype(np.int32)
  got = jit_confusion(jax.device_put(pred, sharding), jax.device_put(gt, sharding),
                      num_classes=NUM_CLASSES)
  np.testing.assert_array_equal(np.asarray(got), naive_confusion(pred, gt, NUM_CLASSES))


def test_confusion_rejects_shape_mismatch():
  with pytest.raises(ValueError, match="pred shape"):
    metrics.confusion_matrix(np.zeros((2, 3), np.int32), np.zeros((3, 2), np.int32), 2)


def test_accumulate_is_int64_and_does_not_overflow():
  batch = jnp.full((2, 2), 2**30, jnp.int32)
  total = np.zeros((2, 2), np.int64)
  for _ in range(4):
    total = metrics.accumulate(total, batch)
  assert total.dtype == np.int64
  np.testing.assert_array_equal(total, np.full((2, 2), 2**32))
  with pytest.raises(ValueError, match="total shape"):
    metrics.accumulate(np.zeros((3, 3), np.int64), batch)


def test_threshold_predictions_exclude_absent_classes():
  scores = np.zeros((2, 1, 2, 3), np.float32)
  scores[:, 0, 0] = [0.9, 0.5, 0.1]  # class 1 (channel 0) is the best, but absent in image 0.
  scores[:, 0, 1] = [0.05, 0.05, 0.05]  # below every threshold.
  labels = np.array([[0, 1, 1], [1, 1, 0]], np.float32)
  predictions = metrics.cam_threshold_predictions(scores, labels, [0.3, 0.5, 0.7])
  assert predictions.shape == (3, 2, 1, 2) and predictions.dtype == jnp.int32
  # Image 0: the best present class is channel 1 (0.5): above 0.3, a tie at 0.5 (background
  # wins), below 0.7.
  np.testing.assert_array_equal(np.asarray(predictions[:, 0, 0, 0]), [2, 0, 0])
  # Image 1: channel 0 (0.9) beats every threshold.
  np.testing.assert_array_equal(np.asarray(predictions[:, 1, 0, 0]), [1, 1, 1])
  np.testing.assert_array_equal(np.asarray(predictions[:, :, 0, 1]), 0)
  no_labels = metrics.cam_threshold_predictions(scores, np.zeros((2, 3), np.float32), [0.0])
  np.testing.assert_array_equal(np.asarray(no_labels), 0)


def test_threshold_sweep_matches_naive_loop():
  scores, labels, gt = random_case(6)
  thresholds = metrics.default_thresholds()
  valid = np.ones(gt.shape, bool)
  valid[-1] = False
  got = jit_sweep(scores, labels, gt, thresholds, num_classes=NUM_FG + 1, valid=valid)
  assert got.shape == (len(thresholds), NUM_FG + 1, NUM_FG + 1) and got.dtype == jnp.int32
  for t, threshold in enumerate(thresholds):
    pred = naive_threshold_predictions(scores, labels, np.float32(threshold))
    np.testing.assert_array_equal(
        np.asarray(got[t]), naive_confusion(pred, gt, NUM_FG + 1, valid=valid),
        err_msg=f"threshold {threshold}")


def test_best_threshold_picks_best_miou():
  perfect = np.diag([5, 3, 2, 0])
  confusions = np.stack([HAND_CONFUSION, perfect, HAND_CONFUSION])
  result = metrics.best_threshold(confusions, [0.1, 0.15, 0.2])
  assert result["threshold"] == 0.15
  assert result["miou"] == 1.0 and result["fp"] == 0.0 and result["fn"] == 0.0
  assert [row["threshold"] for row in result["per_threshold"]] == [0.1, 0.15, 0.2]
  assert result["per_threshold"][0]["miou"] == pytest.approx(HAND_MIOU)
  assert result["per_threshold"][2]["fn"] == pytest.approx(HAND_MEAN_FN)
  with pytest.raises(ValueError, match="len\\(thresholds\\)"):
    metrics.best_threshold(confusions, [0.1, 0.2])


def test_default_thresholds():
  thresholds = metrics.default_thresholds()
  expected = [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]
  assert len(thresholds) == 15
  assert thresholds.tolist() == expected  # exact: the nearest double of each decimal.
  assert metrics.default_thresholds(0.10, 0.45, 0.05).tolist() == expected[:8]


def test_format_table():
  table = metrics.format_table(metrics.segmentation_scores(HAND_CONFUSION),
                               ["background", "cat", "dog", "bird"])
  lines = table.splitlines()
  assert len(lines) == 6  # header, 4 classes, mean.
  assert lines[2].split() == ["cat", "50.00", "0.333", "0.167"]
  assert lines[4].split() == ["bird", "-", "-", "-"]
  assert lines[5].split()[-3:] == ["58.33", "0.167", "0.208"]
  with pytest.raises(ValueError, match="class_names"):
    metrics.format_table(metrics.segmentation_scores(HAND_CONFUSION), ["background"])


def test_all_background_miou_counts_every_class_present_in_the_ground_truth():
  # Ground truth: 6 background, 3 class-1, 1 class-2 pixels; class 3 absent (NaN, skipped).
  confusion = np.array([[5, 1, 0, 0], [2, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
  # Background everywhere: IoU_bg = 6 / 10, classes 1 and 2 get 0, class 3 has no union.
  assert metrics.all_background_miou(confusion) == pytest.approx((6 / 10) / 3)
