"""--mode=predict: label PNGs, overlays and heat maps per image; unreadable files named, skipped."""
import logging

import numpy as np
from PIL import Image
import pytest

from rsepm_jax import predict
from rsepm_jax.configs import demo
from rsepm_jax.data import classes
from rsepm_jax.data import synthetic

SIZES = {"a": (32, 40), "b": (32, 40), "c": (24, 36)}  # (height, width)


def test_predict_writes_outputs_per_image_and_names_the_corrupt_file(tmp_path, save_untrained_checkpoint, caplog):
  config = demo.get_config("smoke")
  config.inference.scales = (1.0, 0.5)
  config.inference.size_bucket = 32  # every view pads to 32 x 32 or 32 x 64: two compilations
  config.inference.conf_th = 0.0  # every class kept: one heat map per class
  workdir = tmp_path / "work"
  save_untrained_checkpoint(config, workdir, 3)

  photos = tmp_path / "photos"
  photos.mkdir()
  rng = np.random.RandomState(0)
  for name, size in SIZES.items():
    Image.fromarray(rng.randint(0, 256, size + (3,)).astype(np.uint8)).save(photos / f"{name}.jpg")
  (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
  (photos / "notes.txt").write_text("not an image: not listed")

  caplog.set_level(logging.INFO)
  written, skipped = predict.predict(config, str(workdir), [str(photos)])
  assert written == 3 and skipped == [str(photos / "broken.jpg")]
  assert "Skipped " + str(photos / "broken.jpg") in caplog.text
  assert "predict: 4/4 images" in caplog.text  # the progress line

  out = workdir / "predictions"
  names = synthetic.CLASS_NAMES[:config.data.num_classes]
  expected = set()
  for name, (height, width) in SIZES.items():
    expected |= {f"{name}.png", f"{name}_overlay.png"} | {f"{name}_cam_{c}.png" for c in names}
    label = Image.open(out / f"{name}.png")
    assert label.mode == "P" and label.size == (width, height)
    np.testing.assert_array_equal(np.asarray(label.getpalette(), np.uint8).reshape(-1, 3),
                                  classes.color_palette())
    assert np.asarray(label).max() <= config.data.num_classes
    present = len(set(np.unique(np.asarray(label)).tolist()) - {0})
    overlay = Image.open(out / f"{name}_overlay.png")
    assert overlay.mode == "RGB" and overlay.size[0] == max(width, 120)
    assert overlay.size[1] == height + 14 * max(present, 1) + 4  # a legend row per class shown
    heat = Image.open(out / f"{name}_cam_{names[0]}.png")
    assert heat.mode == "RGB" and heat.size == (width, height)
  assert {p.name for p in out.iterdir()} == expected

  tagged = tmp_path / "tagged"  # --tags: that class alone in every image, whatever the scores
  assert predict.predict(config, str(workdir), [str(photos / "a.jpg"), str(photos / "c.jpg")],
                         str(tagged), tags=[names[1]])[0] == 2
  assert {p.name for p in tagged.iterdir()} == {
      f"{n}{suffix}" for n in "ac" for suffix in (".png", "_overlay.png", f"_cam_{names[1]}.png")}
  for name in "ac":
    assert set(np.unique(np.asarray(Image.open(tagged / f"{name}.png")))) <= {0, 2}


def test_input_files_takes_files_folders_and_globs(tmp_path):
  for name in ("x.png", "y.JPG", "z.txt"):
    (tmp_path / name).write_bytes(b"")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "w.jpeg").write_bytes(b"")
  assert predict.input_files([str(tmp_path)]) == [str(tmp_path / "x.png"), str(tmp_path / "y.JPG")]
  assert predict.input_files([str(tmp_path / "*.png"), str(tmp_path / "sub" / "w.jpeg")]) == [
      str(tmp_path / "x.png"), str(tmp_path / "sub" / "w.jpeg")]
  with pytest.raises(FileNotFoundError, match="'.*missing.png' is no file, folder or glob"):
    predict.input_files([str(tmp_path / "missing.png")])
  with pytest.raises(FileNotFoundError, match=r"'.*\*.gif' matches no file"):
    predict.input_files([str(tmp_path / "*.gif")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no image"):
    predict.input_files([str(tmp_path / "empty")])


def test_overlay_blends_labelled_pixels_and_adds_a_legend_row_per_class():
  image = np.full((2, 3, 3), 100, np.uint8)
  label = np.array([[0, 1, 1], [0, 0, 3]], np.uint8)
  out = predict.overlay(image, label, ("background", "a", "b", "c"))
  assert out.shape == (2 + 2 * 14 + 4, 120, 3)  # legend rows: classes 1 and 3
  np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # background: the image
  np.testing.assert_array_equal(out[0, 1], [114, 50, 50])  # (100 + VOC colour 1 (128, 0, 0)) / 2
  np.testing.assert_array_equal(out[1, 2], [114, 114, 50])  # colour 3 is (128, 128, 0)
  assert (out[2:] != 255).any()  # something drawn in the legend


def test_output_names_keep_repeated_stems_apart():
  names = predict._output_names(["p/a.jpg", "q/a.png", "q/b.png", "r/a.jpg"])
  assert names == ["a", "a_2", "b", "a_3"]


def test_tags_name_the_classes_of_every_image():
  names = ("background", "aeroplane", "potted plant", "dog")
  np.testing.assert_array_equal(predict.tags_from_names(["Dog", "potted_plant"], names),
                                [False, True, True])
  with pytest.raises(predict.UnknownClassError, match="--tags dgo: unknown class name.*dog"):
    predict.tags_from_names(["dog", "dgo"], names)
