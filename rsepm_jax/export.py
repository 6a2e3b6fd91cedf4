"""`--mode=export`: pseudo-label PNGs of a split from a trained checkpoint (spec 8.1).

`config.export.protocol`:
  "single"  one scale: the decoder's foreground probabilities, bilinear to the image, each
            channel divided by its maximum inside the image, kept for the image's tags only; a
            constant background score `config.export.bg_threshold` is prepended and the argmax
            is the label. Every PNG is (re)written.
  "paper"   the paper's pseudo labels: `paper_eval.predict_label` on each image at its own size
            (multi-scale + flip over `config.inference`, the classes of the GT tags, the
            background of `config.inference.background`, the dense CRF with `config.export.crf`).
  "confident"  the affinity labels of the multi-stage pipeline (components spec D.2; IRNet's
            `cam_to_ir_label`): the multi-scale + flip seeds of the GT tags
            (`single_stage_seeds`: the decoder's, or a CAM-only network's A.5 CAMs) through
            `affinity_labels.confident_labels` with `config.affinity` (fg_threshold,
            bg_threshold, crf): 0 confident background, c + 1 confident class c, 255 unsure.
"paper" and "confident" also take a CAM-only RS+EPM network (`config.model.with_decoder=False`,
Puzzle-CAM: `inference`'s A.5 rule); "single" needs the decoder. They are resumable
(`write_missing_labels`): an image whose PNG exists is skipped without running the network.
Labels: 0 background, c + 1 class c. Written as VOC palette PNGs of the image's own size to
`workdir/pseudo_labels/<split>/<id>.png` ("confident": `workdir/confident_labels/...`),
atomically (`visualize.save_png`), each host its own share of the split
(`pipeline.eval_batches`: records `process_index::process_count`).
"""
import contextlib

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from rsepm_jax import config_check
from rsepm_jax import evaluate
from rsepm_jax import inference
from rsepm_jax import metric_writer
from rsepm_jax import metrics
from rsepm_jax import paper_eval
from rsepm_jax import parallel
from rsepm_jax import train
from rsepm_jax import visualize
from rsepm_jax.data import pipeline
from rsepm_jax.data import preflight
from rsepm_jax.data import records
from rsepm_jax.refine import affinity_labels
from rsepm_jax.train_step import model_inputs

_confident_labels = jax.jit(affinity_labels.confident_labels)  # one compilation per size


def pseudo_labels(seg_logits, labels, crop_box, size, bg_threshold):
  """Labels `int32 [B, *size]` from decoder logits `[B, h, w, C + 1]` and tags `[B, C]`."""
  foreground = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)[..., 1:]
  foreground = evaluate.upsampled_cam_scores(foreground, crop_box, size)
  return metrics.cam_threshold_predictions(foreground, labels, jnp.asarray([bg_threshold]))[0]


def _export_single(model, variables, config, split, mesh, out_dir, progress):
  """The "single" protocol over this host's share of `split`; returns how many it wrote."""

  def predict(variables, batch):
    outputs = model.apply(variables, model_inputs(batch), train=False)
    return pseudo_labels(outputs["seg_logits"], batch["labels"], batch["crop_box"],
                         batch["image"].shape[1:3], config.export.bg_threshold)

  # Every host keeps its own images: the labels stay sharded like the batch.
  predict = jax.jit(predict, out_shardings=parallel.batch_sharded(mesh))
  written = 0
  for index, (host_batch, batch) in enumerate(evaluate.device_eval_batches(config, split, mesh)):
    if index == 0:
      predict = parallel.compile_on_every_process(predict, variables, batch, name="export")
    predicted = predict(variables, batch)
    shards = sorted(predicted.addressable_shards, key=lambda shard: shard.index[0].start)
    local = np.concatenate([np.asarray(shard.data) for shard in shards])
    for label, image_id, box, valid in zip(local, host_batch["id"], host_batch["crop_box"],
                                           host_batch["valid"]):
      if valid:
        visualize.save_png(label[box[0]:box[2], box[1]:box[3]].astype(np.uint8),
                           out_dir / f"{image_id}.png")
        written += 1
    progress.advance(config.eval.global_batch_size)
  return written


def write_missing_labels(batches, out_dir, label_images, progress=None, progress_step=0):
  """The resumable protocols' loop: (written, skipped as already written) over the valid
  records of host `batches` (`pipeline.eval_batches` dicts: image uint8 `[b, S, S, 3]`, labels
  `[b, C]`, crop_box `[b, 4]` = (0, 0, h, w), valid `[b]`, id `[b]`).

  Per batch, the images whose `out_dir/<id>.png` does not exist are cropped to their box and
  labelled together by `label_images(images, tags)` (uint8 RGB `[H_i, W_i, 3]` and bool `[C]`
  lists -> uint8 `[H_i, W_i]` list), then saved; `progress` advances by `progress_step` per
  batch (every host's share)."""
  written = skipped = 0
  for batch in batches:
    paths, images, tags = [], [], []
    for i in np.flatnonzero(batch["valid"]):
      path = out_dir / f"{batch['id'][i]}.png"
      if path.exists():
        skipped += 1
        continue
      top, left, bottom, right = (int(v) for v in batch["crop_box"][i])
      paths.append(path)
      images.append(np.asarray(batch["image"][i, top:bottom, left:right]))
      tags.append(np.asarray(batch["labels"][i]) > 0)
    if paths:
      for path, label in zip(paths, label_images(images, tags)):
        visualize.save_png(label, path)
    written += len(paths)
    if progress is not None:
      progress.advance(progress_step)
  return written, skipped


def tagged_seeds(scores, tags):
  """float32 `[H, W, C]` seeds of `inference.multiscale` outputs `scores`: the foreground (the
  decoder's, or a CAM-only network's A.5 CAMs), each class divided by its maximum (+1e-5), the
  classes outside `tags` (bool `[C]`) 0 (spec 8.1 steps 1-3 with the GT tags)."""
  if scores["rule"] == "stage2":
    raise ValueError("The multi-stage seeds come from the single-stage RS+EPM network "
                     "(config.model.arch='rsepm'); a stage-2 network has none.")
  return inference.segment(scores["pred_mask"], scores["pred_class"], tags,
                           bg_threshold=0.0)["probs"][..., 1:]


def single_stage_seeds(model, variables, images, tags, settings):
  """`tagged_seeds` of uint8 RGB `images [H_i, W_i, 3]` with `tags[i]`, by
  `inference.multiscale_many` with `config.inference` `settings` (multi-scale + flip)."""
  all_scores = inference.multiscale_config(model, variables, images, settings)
  return [tagged_seeds(scores, image_tags) for scores, image_tags in zip(all_scores, tags)]


def write_paper_labels(model, variables, config, batches, out_dir, progress=None):
  """The "paper" protocol by `write_missing_labels` (`paper_eval.predict_labels`, the CRF with
  `config.export.crf`); `progress` advances by `config.eval.global_batch_size` per batch."""
  def label_images(images, tags):
    return paper_eval.predict_labels(model, variables, images, config, tags,
                                     use_crf=config.export.crf)
  return write_missing_labels(batches, out_dir, label_images, progress,
                              config.eval.global_batch_size)


def confident_label_maps(model, variables, images, tags, config):
  """uint8 `[H_i, W_i]` confident labels (0 background, c + 1 class c, 255 unsure) of uint8 RGB
  `images [H_i, W_i, 3]` with GT `tags` (bool `[C]` each): `single_stage_seeds` through
  `affinity_labels.confident_labels` with `config.affinity`, one image per call (one compilation
  per size)."""
  seeds = single_stage_seeds(model, variables, images, tags, config.inference)
  settings = config.affinity
  return [np.asarray(_confident_labels(
      image_seeds[None], settings.fg_threshold, settings.bg_threshold,
      image[None] if settings.crf else None, np.asarray(image_tags)[None]))[0].astype(np.uint8)
          for image, image_seeds, image_tags in zip(images, seeds, tags)]


def write_confident_labels(model, variables, config, batches, out_dir, progress=None):
  """The "confident" protocol by `write_missing_labels` (`confident_label_maps`); `progress`
  advances by `config.eval.global_batch_size` per batch."""
  def label_images(images, tags):
    return confident_label_maps(model, variables, images, tags, config)
  return write_missing_labels(batches, out_dir, label_images, progress,
                              config.eval.global_batch_size)


@records.logs_bad_files
def export_pseudo_labels(config, workdir, step=None, split=None, allow_config_change=False):
  """Writes the PNGs of `split` (default `config.export.split`); returns how many this host wrote.

  `allow_config_change`: see `train.restore_for_inference`."""
  split = split or config.export.split
  config_check.check_mode(config, "export")
  if config.export.protocol == "confident" and config.model.arch != "rsepm":
    raise ValueError("--config.export.protocol=confident labels the seeds of the single-stage "
                     f"network (config.model.arch='rsepm'), not {config.model.arch!r}.")
  mesh = parallel.make_mesh()
  model, variables, step = train.restore_for_inference(config, workdir, mesh, step,
                                                       allow_config_change)
  preflight.check_splits(config.data, evaluated=(split,))
  metric_writer.log_to_file(workdir)
  folder = "confident_labels" if config.export.protocol == "confident" else "pseudo_labels"
  out_dir = epath.Path(workdir) / folder / split
  out_dir.mkdir(parents=True, exist_ok=True)
  progress = metric_writer.CountProgress(f"export {split}",
                                         pipeline.num_records(config.data, split))
  if config.export.protocol in ("paper", "confident"):
    write = write_paper_labels if config.export.protocol == "paper" else write_confident_labels
    batches = iter(pipeline.eval_batches(config.data, split, config.eval.global_batch_size))
    with contextlib.closing(batches):  # grain's read threads stop even when an image fails
      written, skipped = write(model, variables, config, batches, out_dir, progress)
    logging.info("Export %s: skipped %d already written.", split, skipped)
  else:
    written = _export_single(model, variables, config, split, mesh, out_dir, progress)
  logging.info("Wrote %d pseudo-label PNGs of split %r (checkpoint step %d, protocol %r) to %s.",
               written, split, step, config.export.protocol, out_dir)
  return written
