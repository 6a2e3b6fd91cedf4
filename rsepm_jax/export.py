"""`--mode=export`: pseudo-label PNGs of a split from a trained checkpoint (spec 8.1).

`config.export.protocol`:
  "single"  one scale: the decoder's foreground probabilities, bilinear to the image, each
            channel divided by its maximum inside the image, kept for the image's tags only; a
            constant background score `config.export.bg_threshold` is prepended and the argmax
            is the label. Every PNG is (re)written.
  "paper"   the paper's pseudo labels: `paper_eval.predict_label` on each image at its own size
            (multi-scale + flip over `config.inference`, the classes of the GT tags, the
            background of `config.inference.background`, the dense CRF with `config.export.crf`).
            Resumable: an image whose PNG exists is skipped without running the network.
Labels: 0 background, c + 1 class c. Written as VOC palette PNGs of the image's own size to
`workdir/pseudo_labels/<split>/<id>.png` (atomically: `visualize.save_png`), each host its own
share of the split (`pipeline.eval_batches`: records `process_index::process_count`).
"""
import contextlib

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from rsepm_jax import config_check
from rsepm_jax import evaluate
from rsepm_jax import metric_writer
from rsepm_jax import metrics
from rsepm_jax import paper_eval
from rsepm_jax import parallel
from rsepm_jax import train
from rsepm_jax import visualize
from rsepm_jax.data import pipeline
from rsepm_jax.data import preflight
from rsepm_jax.data import records
from rsepm_jax.train_step import model_inputs


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


def write_paper_labels(model, variables, config, batches, out_dir, progress=None):
  """The "paper" protocol: (written, skipped as already written) over the valid records of host
  `batches` (`pipeline.eval_batches` dicts: image uint8 `[b, S, S, 3]`, labels `[b, C]`,
  crop_box `[b, 4]` = (0, 0, h, w), valid `[b]`, id `[b]`); `progress` advances by
  `config.eval.global_batch_size` per batch."""
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
      tags.append(batch["labels"][i] > 0)
    labels = paper_eval.predict_labels(model, variables, images, config, tags,
                                       use_crf=config.export.crf)
    for path, label in zip(paths, labels):
      visualize.save_png(label, path)
    written += len(paths)
    if progress is not None:
      progress.advance(config.eval.global_batch_size)
  return written, skipped


@records.logs_bad_files
def export_pseudo_labels(config, workdir, step=None, split=None, allow_config_change=False):
  """Writes the PNGs of `split` (default `config.export.split`); returns how many this host wrote.

  `allow_config_change`: see `train.restore_for_inference`."""
  split = split or config.export.split
  config_check.check_mode(config, "export")
  if config.model.arch == "rsepm" and not config.model.with_decoder:
    raise ValueError("--mode=export needs the decoder (config.model.with_decoder=True).")
  mesh = parallel.make_mesh()
  model, variables, step = train.restore_for_inference(config, workdir, mesh, step,
                                                       allow_config_change)
  preflight.check_splits(config.data, evaluated=(split,))
  metric_writer.log_to_file(workdir)
  out_dir = epath.Path(workdir) / "pseudo_labels" / split
  out_dir.mkdir(parents=True, exist_ok=True)
  progress = metric_writer.CountProgress(f"export {split}",
                                         pipeline.num_records(config.data, split))
  if config.export.protocol == "paper":
    batches = iter(pipeline.eval_batches(config.data, split, config.eval.global_batch_size))
    with contextlib.closing(batches):  # grain's read threads stop even when an image fails
      written, skipped = write_paper_labels(model, variables, config, batches, out_dir, progress)
    logging.info("Export %s: skipped %d already written.", split, skipped)
  else:
    written = _export_single(model, variables, config, split, mesh, out_dir, progress)
  logging.info("Wrote %d pseudo-label PNGs of split %r (checkpoint step %d, protocol %r) to %s.",
               written, split, step, config.export.protocol, out_dir)
  return written
