"""--mode=export: pseudo-label PNGs of the image's size with only its tags (spec 8.1)."""
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rsepm_jax.configs import demo
from rsepm_jax import export
from rsepm_jax.data import synthetic


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
