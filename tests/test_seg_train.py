"""Stage 2 of the multi-stage pipeline: training masks from a PNG folder (`data.train_mask_dir`),
the supervised step of the DeepLab networks (`seg_train_step`), their LR groups, and
`train.train_and_evaluate` for them (loss, resume, decoder-only evaluation)."""
import flax
import jax
from jax import lax
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image
import pytest

from rsepm_jax import metric_writer
from rsepm_jax import optimizer
from rsepm_jax import parallel
from rsepm_jax import preemption
from rsepm_jax import seg_train_step
from rsepm_jax import state as state_lib
from rsepm_jax import train
from rsepm_jax.configs import demo
from rsepm_jax.configs import voc_deeplab
from rsepm_jax.data import pipeline
from rsepm_jax.data import preflight
from rsepm_jax.data import records
from rsepm_jax.data import sources
from rsepm_jax.data import synthetic
from rsepm_jax.data import transforms
from tests import test_voc


def _write_png(path, mask):
  Image.fromarray(mask).save(path)  # mode "L": class indices as grey values


def _shifted(mask, num_classes):
  """A value permutation of a mask (c -> c + 1 mod C + 1), 255 kept: a stand-in pseudo label."""
  return np.where(mask == 255, 255, (mask.astype(np.int64) + 1) % (num_classes + 1)).astype(
      np.uint8)


def _write_pseudo_labels(config, mask_dir):
  """Writes `_shifted` of every synthetic train mask as `<mask_dir>/<id>.png`."""
  mask_dir.mkdir(exist_ok=True)
  source = synthetic.from_config(config.data, config.data.train_split)
  for index in range(len(source)):
    record = source[index]
    _write_png(mask_dir / f"{record['id']}.png",
               _shifted(record["mask"], config.data.num_classes))
  return source


def _train_source(config):
  return sources.with_train_masks(config.data, sources.make_source(config.data, "train"))


def _smoke(arch="deeplabv3plus"):
  config = demo.get_config("smoke")
  config.model.arch = arch
  return config


# ------------------------------------------------------------------------------- mask folder


def test_mask_folder_replaces_the_masks_of_the_train_source_only(tmp_path):
  config = _smoke()
  ground_truth = _write_pseudo_labels(config, tmp_path / "masks")
  config.data.train_mask_dir = str(tmp_path / "masks")
  source = _train_source(config)
  for index in (0, 5):
    record, truth = source[index], ground_truth[index]
    np.testing.assert_array_equal(record["image"], truth["image"])
    np.testing.assert_array_equal(record["labels"], truth["labels"])
    np.testing.assert_array_equal(record["mask"], _shifted(truth["mask"], 6))
  # Evaluation (and anything else) reads the ground truth.
  np.testing.assert_array_equal(sources.make_source(config.data, "train")[5]["mask"],
                                ground_truth[5]["mask"])


def test_mask_folder_errors_name_the_file(tmp_path):
  config = _smoke()
  config.data.train_mask_dir = str(tmp_path / "absent")
  with pytest.raises(NotADirectoryError, match=r"config\.data\.train_mask_dir=.*absent.* not a"):
    _train_source(config)
  ground_truth = _write_pseudo_labels(config, tmp_path / "masks")
  config.data.train_mask_dir = str(tmp_path / "masks")
  ids = [ground_truth[i]["id"] for i in range(3)]
  (tmp_path / "masks" / f"{ids[0]}.png").unlink()
  bad_values = np.zeros((32, 32), np.uint8)
  bad_values[0, :3] = (7, 9, 255)  # 7 and 9 > C = 6; 255 is ignore
  _write_png(tmp_path / "masks" / f"{ids[1]}.png", bad_values)
  _write_png(tmp_path / "masks" / f"{ids[2]}.png", np.zeros((32, 30), np.uint8))
  source = _train_source(config)
  with pytest.raises(records.BadRecordError, match=rf"masks/{ids[0]}\.png: file not found"):
    source[0]  # pylint: disable=pointless-statement
  with pytest.raises(records.BadRecordError,
                     match=rf"masks/{ids[1]}\.png: mask values \[7, 9\] outside .* 0\.\.6"):
    source[1]  # pylint: disable=pointless-statement
  with pytest.raises(records.BadRecordError, match=rf"masks/{ids[2]}\.png: mask size \(32, 30\)"):
    source[2]  # pylint: disable=pointless-statement


def test_preflight_names_every_missing_pseudo_label_of_a_voc_split(tmp_path):
  records_by_id = {f"2007_{i:06d}": (test_voc._smooth_image(i), test_voc._mask_with_border(i + 1),
                                     None) for i in range(4)}
  test_voc._make_vocdevkit(tmp_path / "voc", records_by_id, split="train_aug",
                           mask_dir="SegmentationClassAug")
  config = voc_deeplab.get_config("smoke")
  config.data.root = str(tmp_path / "voc")
  config.data.allow_subset = True
  config.data.eval_split = "train_aug"  # evaluated with its GT masks, trained on the folder's
  (tmp_path / "pseudo").mkdir()
  for image_id in list(records_by_id)[:2]:
    test_voc._write_palette_png(tmp_path / "pseudo" / f"{image_id}.png",
                                np.zeros((test_voc.H, test_voc.W), np.uint8))
  config.data.train_mask_dir = str(tmp_path / "pseudo")
  config.data.num_workers = 0
  with pytest.raises(preflight.BadSplitError, match=r"2 bad files\n.*pseudo/2007_000002\.png: "
                     r"file not found.*\n.*pseudo/2007_000003\.png: file not found"):
    preflight.check_training_splits(config.data)
  for image_id in list(records_by_id)[2:]:
    test_voc._write_palette_png(tmp_path / "pseudo" / f"{image_id}.png",
                                np.zeros((test_voc.H, test_voc.W), np.uint8))
  preflight.check_training_splits(config.data)
  batch = next(pipeline.train_iterator(config.data, 8, seed=0))
  assert set(np.unique(batch["mask"])) <= {0, 255}  # the folder's all-background masks


def test_masks_follow_the_image_through_the_train_transforms():
  """An image whose red channel encodes its mask: after resize, flip and crop the mask is still
  the colour under it, away from block borders (bicubic blurs those), and padding in the padding.
  The green channel grows to the right: where it falls, the record was flipped."""
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 7, (4, 6)).astype(np.uint8)
  mask = np.kron(blocks, np.ones((12, 12), np.uint8))  # [48, 72]
  ramp = np.broadcast_to(np.linspace(0, 250, 72), mask.shape)
  image = np.stack([mask * 30, ramp, np.full(mask.shape, 90)], -1).astype(np.uint8)
  record = {"image": image, "mask": mask, "labels": np.zeros(6, np.float32), "id": "coded"}
  config = demo.get_config("smoke").data
  config.resize_range, config.crop_size, config.color_jitter = (72, 96), 64, None
  flipped = 0
  for seed in range(12):
    out, seed_rng = record, np.random.default_rng(seed)
    for transform in transforms.train_transforms(config):
      out = transform.random_map(out, seed_rng)
    out_mask, out_image = out["mask"].astype(np.int64), out["image"].astype(np.int64)
    top, left, bottom, right = out["crop_box"]
    inside = np.zeros_like(out_mask, bool)
    inside[top:bottom, left:right] = True
    assert np.all(out_mask[~inside] == 255) and np.all(out_image[~inside] == 0)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(out_mask, 4, mode="edge"), (9, 9))
    uniform = inside & np.all(windows == out_mask[..., None, None], axis=(-2, -1))
    assert uniform.sum() > 150
    decoded = np.rint(out_image[..., 0] / 30)
    np.testing.assert_array_equal(decoded[uniform], out_mask[uniform])
    flipped += np.mean(np.diff(out_image[top:bottom, left:right, 1], axis=1)) < 0
  assert 0 < flipped < 12


def test_folder_masks_take_the_same_geometric_transforms_as_the_ground_truth(tmp_path):
  config = _smoke()
  config.data.num_workers = 0
  _write_pseudo_labels(config, tmp_path / "masks")
  truth = next(pipeline.train_iterator(config.data, 8, seed=3))
  config.data.train_mask_dir = str(tmp_path / "masks")
  pseudo = next(pipeline.train_iterator(config.data, 8, seed=3))
  np.testing.assert_array_equal(pseudo["image"], truth["image"])
  np.testing.assert_array_equal(pseudo["crop_box"], truth["crop_box"])
  np.testing.assert_array_equal(pseudo["mask"], _shifted(truth["mask"], 6))


# ------------------------------------------------------------------------------- loss, LR groups


def _bilinear_numpy(x, size):
  """PyTorch's bilinear resize (align_corners=False) of `x [H, W, C]`, pixel by pixel."""
  in_h, in_w = x.shape[:2]
  out = np.zeros(size + x.shape[2:])
  for i in range(size[0]):
    for j in range(size[1]):
      sy = max((i + 0.5) * in_h / size[0] - 0.5, 0.0)
      sx = max((j + 0.5) * in_w / size[1] - 0.5, 0.0)
      y0, x0 = min(int(sy), in_h - 1), min(int(sx), in_w - 1)
      y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
      fy, fx = sy - y0, sx - x0
      out[i, j] = ((1 - fy) * ((1 - fx) * x[y0, x0] + fx * x[y0, x1])
                   + fy * ((1 - fx) * x[y1, x0] + fx * x[y1, x1]))
  return out


def test_segmentation_loss_matches_numpy_over_the_global_batch():
  rng = np.random.default_rng(0)
  num_devices = jax.device_count()
  logits = rng.normal(size=(num_devices, 3, 4, 5)).astype(np.float32) * 3
  mask = rng.integers(0, 5, (num_devices, 12, 16)).astype(np.uint8)
  # Devices see very different numbers of valid pixels: the mean is over the global batch.
  for device in range(num_devices):
    mask[device].reshape(-1)[:device * 20] = 255
  expected_total, expected_count = 0.0, 0
  for image_logits, image_mask in zip(logits, mask):
    upsampled = _bilinear_numpy(image_logits.astype(np.float64), (12, 16))
    log_probs = upsampled - np.log(np.exp(upsampled).sum(-1, keepdims=True))
    for (row, col), label in np.ndenumerate(image_mask):
      if label != 255:
        expected_total -= log_probs[row, col, label]
        expected_count += 1
  mesh = parallel.make_mesh()
  loss = jax.jit(jax.shard_map(
      lambda l, m: lax.pmean(seg_train_step.segmentation_loss(l, m), parallel.DATA_AXIS),
      mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)), out_specs=P()))(
          logits, mask)
  np.testing.assert_allclose(float(loss), expected_total / expected_count, rtol=1e-5)


@pytest.mark.parametrize("arch,new_modules", [("deeplabv3plus", {"aspp", "decoder"}),
                                              ("deeplabv2", {"aspp"})])
def test_lr_groups_of_the_deeplab_networks(arch, new_modules):
  """One SGD step on unit gradients: the backbone's weights and biases move at x1 / x2 of the
  LR, the new layers' at x10 / x20 (the voc_deeplab recipe)."""
  config = voc_deeplab.get_config("smoke")
  config.model.arch = arch
  model = state_lib.build_model(config)
  shapes = jax.eval_shape(lambda r: model.init(r, np.zeros((1, 32, 32, 3), np.float32)),
                          jax.random.key(0))["params"]
  assert set(shapes) == {"backbone"} | new_modules
  config.optim.weight_decay = 0.0
  tx = optimizer.make_optimizer(config.optim, total_steps=10)
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  updates, _ = jax.jit(tx.update)(jax.tree.map(np.ones_like, params), tx.init(params), params)
  # Nesterov's first step on a unit gradient moves by (1 + momentum) x the group's LR.
  assert config.optim.nesterov
  unit = -config.optim.lr * (1 + config.optim.momentum)
  multipliers = {"backbone_weight": 1, "backbone_bias": 2, "new_weight": 10, "new_bias": 20}
  seen = set()
  for path, update in flax.traverse_util.flatten_dict(updates).items():
    part = "backbone" if path[0] == "backbone" else "new"
    group = f"{part}_{'bias' if path[-1] == 'bias' else 'weight'}"
    np.testing.assert_allclose(update, multipliers[group] * unit, rtol=1e-6, err_msg=str(path))
    seen.add(group)
  assert seen == set(multipliers)


# ------------------------------------------------------------------------------- training


def test_deeplab_trains_on_pseudo_labels_resumes_and_evaluates(tmp_path, monkeypatch):
  config = _smoke()
  _write_pseudo_labels(config, tmp_path / "masks")
  config.data.train_mask_dir = str(tmp_path / "masks")
  config.data.synthetic.num_eval = 8
  config.train.update(num_epochs=2, log_every=1, checkpoint_every=8)
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as patch:  # a preemption notice during step 3
    patch.setattr(preemption.PreemptionWatch, "reached", lambda self, step: step == 3)
    assert train.train_and_evaluate(config, workdir) == {"preempted_at_step": 3}
  results = train.train_and_evaluate(config, workdir)
  logged = [r for r in metric_writer.read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in logged] == list(range(1, 9))  # resumed at step 4
  losses = [r["loss_seg"] for r in logged]
  assert losses == [r["loss"] for r in logged]
  assert np.mean(losses[-3:]) < 0.5 * losses[0]
  assert "cam" not in results and set(results["decoder"]) >= {"miou", "iou"}
  assert len(results["decoder"]["iou"]) == config.data.num_classes + 1
  assert (tmp_path / "run" / "eval" / "step_8.json").exists()
