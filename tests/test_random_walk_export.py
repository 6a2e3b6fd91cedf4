"""The multi-stage pipeline's data products: confident affinity labels (--mode=export with
`export.protocol = "confident"`) and random-walk pseudo labels (`random_walk_export`), checked
against NumPy thresholds, cell means and one hand-written walk step; the AffinityNet arch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from PIL import Image

from rsepm_jax import config_check
from rsepm_jax import export
from rsepm_jax import inference
from rsepm_jax import random_walk_export
from rsepm_jax.configs import demo
from rsepm_jax.data import synthetic
from rsepm_jax.models import affinity
from rsepm_jax.models import networks
from rsepm_jax.refine import affinity_labels
from tests import test_inference

NUM_CLASSES = test_inference.NUM_CLASSES
SIZE = 32  # the records' padded side
# (height, width): not multiples of 4 (the stride-4 grid is ceil), two of one size.
IMAGE_SIZES = ((18, 27), (32, 24), (18, 27))
TAGS = ((1, 0, 1), (0, 1, 0), (1, 1, 0))


def records():
  """One `pipeline.eval_batches` batch of the 3 images, then an invalid record; and the crops."""
  rng = np.random.RandomState(0)
  batch = {"image": np.zeros((4, SIZE, SIZE, 3), np.uint8),
           "labels": np.zeros((4, NUM_CLASSES), np.float32),
           "crop_box": np.zeros((4, 4), np.int32), "valid": np.array([True, True, True, False]),
           "id": np.array(["a", "b", "c", "padding"])}
  crops = []
  for i, ((h, w), tags) in enumerate(zip(IMAGE_SIZES + ((SIZE, SIZE),), TAGS + ((1, 1, 1),))):
    image = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
    batch["image"][i, :h, :w] = image
    batch["labels"][i] = tags
    batch["crop_box"][i] = (0, 0, h, w)
    crops.append((image, np.asarray(tags, bool)))
  return batch, crops[:3]


def stub_config():
  config = demo.get_config("smoke")
  config.data.num_classes = NUM_CLASSES
  config.inference.scales = (1.0, 0.5)
  return config


def reference_seeds(image, tags):
  """Spec 8.1 steps 1-3 with GT tags: `inference.multiscale`'s foreground over its max."""
  scores = inference.multiscale(test_inference.StubNet(), test_inference.stub_variables(), image,
                                (1.0, 0.5))
  foreground = scores["pred_mask"][..., 1:].astype(np.float64)
  return foreground / (foreground.max(axis=(0, 1)) + 1e-5) * tags


def argmax_with_background(background, scores):
  """Label 0 unless a class beats `background` (ties to the background), else 1 + the class."""
  best = scores.argmax(axis=-1)
  return np.where(scores.max(axis=-1) > background, best + 1, 0)


def read_png(path):
  png = Image.open(path)
  assert png.mode == "P"
  return np.asarray(png)


def test_networks_build_the_affinity_net_from_the_config():
  config = demo.get_config("smoke")
  config.model.arch = "affinity"
  config.model.dtype = "bfloat16"
  model = networks.from_config(config, bn_axis_name="data")
  assert isinstance(model, affinity.AffinityNet)
  assert (model.backbone, model.backbone_width, model.dtype) == ("tiny", 8, jnp.bfloat16)
  assert (model.output_stride, model.last_stride) == (16, 1)  # official, not the smoke's 8
  assert networks.ARCH_NAMES["affinity"] == "AffinityNet"
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                       jax.ShapeDtypeStruct((1, 30, 21, 3), jnp.float32))
  assert out["edge_logits"].shape == (1, 8, 6, 1)


def test_config_checks_the_affinity_and_random_walk_keys():
  config = demo.get_config("smoke")
  config.export.protocol = "confident"
  config_check.validate(config)
  config.rw.radius = 1
  config.rw.exp_times = -1
  config.affinity.bg_threshold = 0.4  # above fg_threshold 0.30
  with pytest.raises(config_check.ConfigError) as error:
    config_check.validate(config)
  for key in ("config.rw.radius=1", "config.rw.exp_times=-1", "config.affinity.bg_threshold=0.4"):
    assert key in str(error.value)


def test_confident_labels_are_the_two_thresholds_of_the_seeds_and_resume(tmp_path):
  config = stub_config()
  config.affinity.crf = False
  batch, crops = records()
  model, variables = test_inference.StubNet(), test_inference.stub_variables()
  out_dir = epath.Path(tmp_path)

  assert export.write_confident_labels(model, variables, config, [batch], out_dir) == (3, 0)
  assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "b.png", "c.png"]
  unsure = 0
  for image_id, (image, tags) in zip("abc", crops):
    label = read_png(out_dir / f"{image_id}.png")
    seeds = reference_seeds(image, tags)
    fg = argmax_with_background(0.30, seeds)
    bg = argmax_with_background(0.05, seeds)
    expected = np.where(fg > 0, fg, np.where(bg == 0, 0, 255))
    np.testing.assert_array_equal(label, expected)
    assert set(np.unique(label)) <= {0, 255} | set(np.flatnonzero(tags) + 1)
    unsure += np.sum(label == 255)
  assert unsure > 0
  assert export.write_confident_labels(model, variables, config, [batch], out_dir) == (0, 3)


def test_stride4_scores_are_cell_means_over_the_image_divided_by_the_class_max():
  rng = np.random.RandomState(1)
  seeds = rng.rand(10, 7, 2).astype(np.float32)
  seeds[..., 1] = 0.0  # an untagged class stays 0
  expected = np.zeros((3, 2, 2))
  for i in range(3):
    for j in range(2):
      expected[i, j] = seeds[4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1, 2).mean(axis=0)
  expected /= expected.max(axis=(0, 1)) + 1e-5
  np.testing.assert_allclose(random_walk_export.stride4_scores(seeds), expected, rtol=1e-5)


def zero_edge_affinity_net():
  """A tiny AffinityNet whose edge logit is -1e4 everywhere (a zero kernel ignores the features,
  so every other variable may be 0): every edge probability is 0."""
  model = affinity.AffinityNet(backbone="tiny", backbone_width=8)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  variables = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
  variables["params"]["edge_logit"]["bias"][:] = -1e4
  return model, variables


def one_walk_step(scores, radius):
  """x T with every in-image affinity 1: each cell's mean over itself and its disc neighbours
  (dy^2 + dx^2 < r^2) inside the grid."""
  height, width = scores.shape[:2]
  out = np.zeros_like(scores)
  for y in range(height):
    for x in range(width):
      cells = [(y + dy, x + dx) for dy in range(1 - radius, radius)
               for dx in range(1 - radius, radius)
               if dy * dy + dx * dx < radius * radius
               and 0 <= y + dy < height and 0 <= x + dx < width]
      out[y, x] = np.mean([scores[cell] for cell in cells], axis=0)
  return out


def test_random_walk_labels_with_no_edges_and_one_step_follow_the_seeds(tmp_path):
  config = stub_config()
  batch, crops = records()
  model, variables = test_inference.StubNet(), test_inference.stub_variables()
  edge_model, edge_variables = zero_edge_affinity_net()
  out_dir = epath.Path(tmp_path)
  np.testing.assert_array_equal(
      affinity.edge_maps(edge_model, edge_variables, crops[0][0][None], 64), 0.0)
  settings = dict(radius=3, beta=10.0, exp_times=0, bg_threshold=0.25, edge_size=64)

  assert random_walk_export.write_random_walk_labels(
      model, variables, edge_model, edge_variables, config, [batch], out_dir,
      **settings) == (3, 0)
  assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "b.png", "c.png"]
  values = set()
  for image_id, (image, tags) in zip("abc", crops):
    label = read_png(out_dir / f"{image_id}.png")
    height, width = image.shape[:2]
    assert label.shape == (height, width)
    seeds = reference_seeds(image, tags)
    grid_h, grid_w = -(-height // 4), -(-width // 4)
    cells = np.zeros((grid_h, grid_w, NUM_CLASSES))
    for i in range(grid_h):
      for j in range(grid_w):
        cells[i, j] = seeds[4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1, NUM_CLASSES).mean(axis=0)
    cells /= cells.max(axis=(0, 1)) + 1e-5
    walk = one_walk_step(cells, settings["radius"])
    up = np.asarray(jax.image.resize(walk, (4 * grid_h, 4 * grid_w, NUM_CLASSES), "linear"),
                    np.float64)[:height, :width]
    up /= up.max()
    expected = argmax_with_background(settings["bg_threshold"], up)
    # Pixels whose two best scores (background included) are within float32 rounding may differ.
    top2 = np.sort(np.concatenate([np.full((height, width, 1), 0.25), up], axis=-1), axis=-1)
    clear = top2[..., -1] - top2[..., -2] > 1e-4
    np.testing.assert_array_equal(label[clear], expected[clear])
    assert clear.mean() > 0.95
    assert set(np.unique(label)) <= {0} | set(np.flatnonzero(tags) + 1)
    values |= set(np.unique(label).tolist())
  assert len(values) >= 3  # background and several classes: the check is not trivial
  assert random_walk_export.write_random_walk_labels(
      model, variables, edge_model, edge_variables, config, [batch], out_dir,
      **settings) == (0, 3)

  # crf_iters: the walk's labels then go through the label CRF (Puzzle-CAM's 1 iteration).
  crf_dir = epath.Path(tmp_path / "crf")
  crf_dir.mkdir()
  assert random_walk_export.write_random_walk_labels(
      model, variables, edge_model, edge_variables, config, [batch], crf_dir, **settings,
      crf_iters=1) == (3, 0)
  for image_id, (image, tags) in zip("abc", crops):
    walked = read_png(out_dir / f"{image_id}.png")
    want = affinity_labels.label_crf(image[None], walked[None].astype(np.int32), tags[None], 1)
    np.testing.assert_array_equal(read_png(crf_dir / f"{image_id}.png"), np.asarray(want)[0])
    assert set(np.unique(read_png(crf_dir / f"{image_id}.png"))) <= {0} | set(
        np.flatnonzero(tags) + 1)


def test_exports_from_checkpoints_write_labels_of_the_tags(tmp_path,
                                                          save_untrained_checkpoint):
  """--mode=export with the "confident" protocol (CRF on), then `export_random_walk` from the
  same RS+EPM checkpoint and an AffinityNet one (their resuming: the tests above)."""
  config = demo.get_config("smoke")
  config.export.split = "val"
  config.export.protocol = "confident"
  config.data.synthetic.num_eval = 4
  config.inference.scales = (1.0,)
  config.rw.exp_times = 2
  config.rw.edge_size = 64
  affinity_config = demo.get_config("smoke")
  affinity_config.model.arch = "affinity"
  rsepm_dir, affinity_dir = tmp_path / "rsepm", tmp_path / "affinity"
  save_untrained_checkpoint(config, rsepm_dir, 3)
  save_untrained_checkpoint(affinity_config, affinity_dir, 2)
  source = synthetic.from_config(config.data, "val")
  rw_dir = tmp_path / "rw" / "val"

  assert export.export_pseudo_labels(config, str(rsepm_dir)) == len(source) == 4
  assert random_walk_export.export_random_walk(config, str(rsepm_dir), affinity_config,
                                               str(affinity_dir), rw_dir) == 4
  confident_values = set()
  for index in range(len(source)):
    record = source[index]
    tagged = {int(c) + 1 for c in np.flatnonzero(record["labels"])}
    confident = read_png(rsepm_dir / "confident_labels" / "val" / f"{record['id']}.png")
    walked = read_png(rw_dir / f"{record['id']}.png")
    assert confident.shape == walked.shape == record["image"].shape[:2]
    assert set(np.unique(confident).tolist()) <= {0, 255} | tagged
    assert set(np.unique(walked).tolist()) <= {0} | tagged
    confident_values |= set(np.unique(confident).tolist())
  assert confident_values - {0, 255}  # each tagged class's seed peak is 1: confident somewhere
  with pytest.raises(ValueError, match=r"affinity_config.model.arch must be 'affinity'"):
    random_walk_export.export_random_walk(config, str(rsepm_dir), config, str(rsepm_dir), rw_dir)
