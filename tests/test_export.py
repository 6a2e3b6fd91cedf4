"""--mode=export: pseudo-label PNGs of the image's size with only its tags (spec 8.1); the
"paper" protocol writes `paper_eval.predict_label` of each crop and resumes a killed run."""
from etils import epath
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rsepm_jax.configs import demo
from rsepm_jax import export
from rsepm_jax import paper_eval
from rsepm_jax.data import synthetic
from tests import test_inference
from tests import test_paper_eval


def test_pseudo_labels_keep_tagged_classes_above_the_background_score():
  logits = np.full((1, 4, 4, 4), -5.0, np.float32)
  logits[..., 0] = 0.0  # background
  logits[0, :, :2, 1] = 5.0  # class 0 confident on the left half ...
  logits[0, :, 2:, 1] = -1.0  # ... weak on the right
  logits[0, :, :, 3] = 8.0  # class 2 everywhere, but it is not tagged
  labels = jnp.asarray([[1.0, 0.0, 0.0]])
  box = jnp.asarray([[0, 0, 8, 8]])
  out = np.asarray(export.pseudo_labels(jnp.asarray(logits), labels, box, (8, 8), 0.45))
  assert out.shape == (1, 8, 8)
  assert set(np.unique(out)) == {0, 1}  # class 2 + 1 = 3 never appears
  assert np.all(out[0, :, :3] == 1) and np.all(out[0, :, 5:] == 0)


def test_export_writes_one_png_per_image_with_its_size_and_tags(tmp_path, save_untrained_checkpoint):
  config = demo.get_config("smoke")
  config.export.split = "val"
  config.export.bg_threshold = 0.1
  save_untrained_checkpoint(config, tmp_path, 3)

  assert export.export_pseudo_labels(config, str(tmp_path)) == config.data.synthetic.num_eval
  source = synthetic.from_config(config.data, "val")
  labelled = 0
  for index in range(len(source)):
    record = source[index]
    png = Image.open(tmp_path / "pseudo_labels" / "val" / f"{record['id']}.png")
    assert png.mode == "P" and png.size == record["image"].shape[1::-1]
    values = set(np.unique(np.asarray(png)).tolist())
    assert values <= {0} | {int(c) + 1 for c in np.nonzero(record["labels"])[0]}
    labelled += values != {0}
  assert labelled > 0  # an untrained decoder still puts its tags somewhere above 0.1


def test_paper_labels_are_predict_label_of_each_crop_with_its_tags(tmp_path):
  config = demo.get_config("smoke")
  config.data.num_classes = test_inference.NUM_CLASSES
  config.inference.scales = (1.0, 0.5)
  batch, crops = test_paper_eval.records()
  batch["id"] = np.array(["a", "b", "c", "padding"])
  model, variables = test_inference.StubNet(), test_inference.stub_variables()
  out_dir = epath.Path(tmp_path)

  assert export.write_paper_labels(model, variables, config, [batch], out_dir) == (3, 0)
  assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "b.png", "c.png"]  # no padding
  for image_id, (image, _, tags) in zip("abc", crops):
    png = Image.open(tmp_path / f"{image_id}.png")
    assert png.mode == "P" and png.size == (image.shape[1], image.shape[0])
    label = np.asarray(png)
    np.testing.assert_array_equal(label, paper_eval.predict_label(
        model, variables, image, config, tags=tags, use_crf=True))
    assert set(np.unique(label)) <= {0} | set(np.flatnonzero(tags) + 1)
  assert export.write_paper_labels(model, variables, config, [batch], out_dir) == (0, 3)


def test_paper_export_resumes_where_a_killed_run_stopped(tmp_path, save_untrained_checkpoint):
  config = demo.get_config("smoke")
  config.export.split = "val"
  config.export.protocol = "paper"
  config.inference.scales = (1.0, 0.5)
  save_untrained_checkpoint(config, tmp_path, 3)
  out_dir = tmp_path / "pseudo_labels" / "val"
  source = synthetic.from_config(config.data, "val")

  assert export.export_pseudo_labels(config, str(tmp_path)) == len(source)
  labels, labelled = {}, 0
  for index in range(len(source)):
    record = source[index]
    png = Image.open(out_dir / f"{record['id']}.png")
    assert png.mode == "P" and png.size == record["image"].shape[1::-1]
    labels[record["id"]] = np.asarray(png)
    values = set(np.unique(labels[record["id"]]).tolist())
    assert values <= {0} | {int(c) + 1 for c in np.flatnonzero(record["labels"])}
    labelled += values != {0}
  assert labelled > 0
  assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{i}.png" for i in labels)
  mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}

  assert export.export_pseudo_labels(config, str(tmp_path)) == 0  # all there: nothing rewritten
  assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == mtimes

  # A run killed while writing one PNG: its temporary file is there, the PNG is not.
  victim = source[1]["id"]
  (out_dir / f"{victim}.png").unlink()
  (out_dir / f"{victim}.png.tmp").write_bytes(b"\x89PNG\r\n\x1a\n")
  assert export.export_pseudo_labels(config, str(tmp_path)) == 1
  np.testing.assert_array_equal(np.asarray(Image.open(out_dir / f"{victim}.png")), labels[victim])
  assert not (out_dir / f"{victim}.png.tmp").exists()
  assert {name: t for name, t in mtimes.items() if name != f"{victim}.png"} == {
      p.name: p.stat().st_mtime_ns for p in out_dir.iterdir() if p.name != f"{victim}.png"}
