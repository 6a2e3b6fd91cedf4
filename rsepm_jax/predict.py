"""`--mode=predict`: segment image files with a trained checkpoint (multi-scale + flip, spec 8.1).

`--input` takes image files, folders (their .jpg/.jpeg/.png/.bmp/.webp files) and globs,
comma-separated. Per image `<name>` the output folder gets
  <name>.png              VOC palette PNG of the image's size (0 background, c + 1 class c)
  <name>_overlay.png      the image blended with the label colours, a legend of the classes below
  <name>_cam_<class>.png  the CAM heat map (jet, blended with the image) of each predicted class
Classes are those of `--tags` (names, for every image) or else those the network finds (mean
score >= `config.inference.conf_th`; stage-2 networks: a pixel probability >= `stage2_class_th`);
heat maps are the CAMs (stage 2: the class probabilities). An image that cannot be read is
logged by name and skipped. With several processes each writes its share of the files.
"""
import glob
import os

from absl import logging
from etils import epath
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

from rsepm_jax import config_check
from rsepm_jax import evaluate
from rsepm_jax import inference
from rsepm_jax import metric_writer
from rsepm_jax import parallel
from rsepm_jax import train
from rsepm_jax import visualize
from rsepm_jax.data import classes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def input_files(inputs):
  """Sorted image paths from `inputs`: files, folders (image extensions only) and globs."""
  found = []
  for entry in inputs:
    if os.path.isdir(entry):
      found += sorted(os.path.join(entry, name) for name in os.listdir(entry)
                      if name.lower().endswith(IMAGE_EXTENSIONS))
    elif glob.has_magic(entry):
      matches = sorted(glob.glob(entry))
      if not matches:
        raise FileNotFoundError(f"--input {entry!r} matches no file.")
      found += matches
    elif os.path.isfile(entry):
      found.append(entry)
    else:
      raise FileNotFoundError(f"--input {entry!r} is no file, folder or glob pattern.")
  if not found:
    raise FileNotFoundError(f"--input {','.join(inputs)!r} holds no image "
                            f"({'/'.join(IMAGE_EXTENSIONS)}).")
  return found


def overlay(image, label, names, alpha=0.5):
  """uint8 RGB `[H, W, 3]` with the labelled pixels blended with their palette colour, and a
  legend (colour square + name of each label present) appended below."""
  palette = classes.color_palette()
  blended = np.where(label[..., None] > 0,
                     (1 - alpha) * image + alpha * palette[label], image).astype(np.uint8)
  present = [int(v) for v in np.unique(label) if v > 0]
  row = 14
  legend_height = row * max(len(present), 1) + 4
  canvas = Image.new("RGB", (max(image.shape[1], 120), image.shape[0] + legend_height), "white")
  canvas.paste(Image.fromarray(blended), (0, 0))
  draw = ImageDraw.Draw(canvas)
  top = image.shape[0] + 2
  for i, value in enumerate(present):
    y = top + i * row
    draw.rectangle([2, y, 12, y + 10], fill=tuple(int(c) for c in palette[value]), outline="black")
    draw.text((16, y - 1), names[value], fill="black")
  if not present:
    draw.text((2, top - 1), "no class predicted", fill="black")
  return np.asarray(canvas)


def heat_map(image, cam):
  """uint8 RGB `[H, W, 3]`: the image blended half and half with `jet(cam)` (`[H, W]` in [0, 1])."""
  return np.asarray(visualize.to_uint8(0.5 * image + 127.5 * visualize.jet(cam)))


def _output_names(files):
  """A distinct output name per file: its stem, `_2`, `_3`... appended to repeated stems."""
  names, seen = [], {}
  for path in files:
    stem = os.path.splitext(os.path.basename(path))[0]
    seen[stem] = seen.get(stem, 0) + 1
    names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
  return names


class UnknownClassError(ValueError):
  """A `--tags` name that is not one of the config's classes (the message lists them)."""


def tags_from_names(tags, names):
  """bool `[C]` multi-hot of the class `tags` (names as in `names[1:]`, case and spaces or
  underscores alike); an unknown name is an error listing the classes."""
  def key(name):
    return name.lower().replace(" ", "").replace("_", "")
  index = {key(name): i for i, name in enumerate(names[1:])}
  unknown = [tag for tag in tags if key(tag) not in index]
  if unknown:
    raise UnknownClassError(f"--tags {','.join(unknown)}: unknown class name(s); the classes are "
                     f"{', '.join(names[1:])}.")
  multi_hot = np.zeros(len(names) - 1, bool)
  multi_hot[[index[key(tag)] for tag in tags]] = True
  return multi_hot


def _read_image(path):
  """uint8 RGB `[H, W, 3]`, or None (logged) when `path` is not a readable image."""
  try:
    with Image.open(path) as opened:
      return np.asarray(opened.convert("RGB"))
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    logging.warning("Skipped %s: not a readable image (%s).", path, error)
    return None


def predict(config, workdir, inputs, output=None, step=None, allow_config_change=False, tags=None):
  """Segments the images of `inputs` (see `input_files`) with the checkpoint `step` (default:
  latest) of `workdir`; writes to `output` (default `workdir/predictions`). `tags`: class names
  present in every image (default: the classes the network finds, `inference.segment_scores`).
  Images are read `config.inference.max_batch` x 4 at a time and those of one size share
  device calls (`inference.multiscale_many`).

  Returns (number of images written by this process, paths of the files skipped as unreadable).
  """
  config_check.check_mode(config, "predict")
  settings = config.inference
  files = input_files(inputs)
  names = evaluate.class_names(config)
  multi_hot = tags_from_names(tags, names) if tags else None
  mesh = parallel.make_mesh()
  model, variables, step = train.restore_for_inference(config, workdir, mesh, step,
                                                       allow_config_change, reads_data=False)
  metric_writer.log_to_file(workdir)
  out_dir = epath.Path(output or epath.Path(workdir) / "predictions")
  out_dir.mkdir(parents=True, exist_ok=True)
  mine = slice(jax.process_index(), None, jax.process_count())
  files, out_names = files[mine], _output_names(files)[mine]
  progress = metric_writer.CountProgress("predict", len(files))
  written, skipped = 0, []
  chunk = 4 * settings.max_batch
  for start in range(0, len(files), chunk):
    images, kept = [], []
    for path, name in zip(files[start:start + chunk], out_names[start:start + chunk]):
      image = _read_image(path)
      if image is None:
        skipped.append(path)
      else:
        images.append(image)
        kept.append(name)
    all_scores = inference.multiscale_config(model, variables, images, settings)
    for image, name, scores in zip(images, kept, all_scores):
      result = inference.segment_scores(scores, settings, multi_hot)
      visualize.save_png(result["label"], out_dir / f"{name}.png")
      visualize.save_png(overlay(image, result["label"], names), out_dir / f"{name}_overlay.png")
      for key in result["keys"]:
        visualize.save_png(heat_map(image, scores["cams"][..., key]),
                           out_dir / f"{name}_cam_{names[key + 1].replace(' ', '_')}.png")
      written += 1
    progress.advance(len(files[start:start + chunk]))
  skipped_note = f"; skipped {len(skipped)} unreadable: {', '.join(skipped)}" if skipped else ""
  logging.info("Wrote the predictions of %d images (checkpoint step %d) to %s%s.", written, step,
               out_dir, skipped_note)
  return written, skipped
