"""Training loop: `train_and_evaluate(config, workdir)` and `evaluate_checkpoint`.

Reads top to bottom: workdir, mesh, input, model and optimiser, checkpoint restore, the jitted
step, the loop (progress, checkpoints, evaluations), the final evaluation. Re-running the same
command resumes from the latest checkpoint in `workdir`, data position included.
"""
import contextlib
import json
import time

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from rsepm_jax import affinity_train_step
from rsepm_jax import checkpoint
from rsepm_jax import config_check
from rsepm_jax import evaluate
from rsepm_jax import metric_writer
from rsepm_jax import optimizer
from rsepm_jax import paper_eval
from rsepm_jax import parallel
from rsepm_jax import preemption
from rsepm_jax import puzzle_train_step
from rsepm_jax import seg_train_step
from rsepm_jax import state as state_lib
from rsepm_jax import train_step
from rsepm_jax import visualize
from rsepm_jax.data import pipeline
from rsepm_jax.data import preflight
from rsepm_jax.data import records
from rsepm_jax.models import convert


def prepare_workdir(workdir):
  """Creates `workdir` (a clear error if it cannot)."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OSError(f"Cannot create workdir {workdir!r}: {e}") from e
  if not path.is_dir():
    raise NotADirectoryError(f"workdir {workdir!r} exists and is not a directory.")
  return path


def write_config(workdir, config):
  """`workdir/config.json` (process 0): the config of the latest training run."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(config.to_json(indent=2))


# A progress line warns when the loop spent more than this share of its time waiting for input.
WAIT_WARNING_FRACTION = 0.2


def schedule_lengths(config):
  """(steps per epoch, total steps) from the split size and the global batch, an epoch capped at
  `train.max_steps_per_epoch` steps when that is > 0 (the data order runs on across epochs)."""
  num_train = pipeline.num_records(config.data, config.data.train_split)
  steps_per_epoch = num_train // config.train.global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f"The train split has {num_train} images, fewer than one global batch "
        f"(config.train.global_batch_size={config.train.global_batch_size}).")
  if config.train.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
  return steps_per_epoch, steps_per_epoch * config.train.num_epochs


class Progress:
  """Console progress lines with images/s, ETA and the input wait, and the metrics file."""

  def __init__(self, writer, total_steps, global_batch_size, start_step, data_iter):
    self._writer = writer
    self._total = total_steps
    self._batch = global_batch_size
    self._data_iter = data_iter
    self._last_step = start_step
    self._last_time = time.time()
    self._last_wait = data_iter.wait_seconds

  def restart_clock(self):
    """Starts the images/s and ETA clock now (after compilation, which is not throughput)."""
    self._last_time = time.time()
    self._last_wait = self._data_iter.wait_seconds

  def report(self, step, measurements):
    now = time.time()
    elapsed = max(now - self._last_time, 1e-9)
    images_per_s = (step - self._last_step) * self._batch / elapsed
    eta = (self._total - step) * self._batch / max(images_per_s, 1e-9)
    data_wait = min((self._data_iter.wait_seconds - self._last_wait) / elapsed, 1.0)
    self._last_step, self._last_time = step, now
    self._last_wait = self._data_iter.wait_seconds
    scalars = {**measurements, "images_per_s": images_per_s, "data_wait_fraction": data_wait}
    self._writer.write(step, scalars)
    terms = " ".join(f"{k}={v:.4f}" for k, v in measurements.items() if k.startswith("loss_"))
    logging.info(
        "step %d/%d loss=%.4f %s lr=%.5f grad_norm=%.3f %.1f img/s ETA %s",
        step, self._total, measurements["loss"], terms, measurements["lr"],
        measurements["grad_norm"], images_per_s, time.strftime("%H:%M:%S", time.gmtime(eta)))
    if data_wait > WAIT_WARNING_FRACTION:
      logging.warning(
          "Input-bound: waited for data %.0f%% of the time since the last report (step %d); "
          "raise config.data.num_workers or config.data.read_threads.", 100 * data_wait, step)


def _check_finite(pending):
  """Raises on the first non-finite loss among `[(step, metrics)]` fetched from the device."""
  for step, measurements in pending:
    loss = float(measurements["loss"])
    if not np.isfinite(loss) or float(measurements["non_finite"]):
      raise FloatingPointError(
          f"Non-finite loss or update (loss={loss}) at step {step}; training stopped. The update "
          "was not applied and the last checkpoint is intact: lower config.optim.lr or check "
          "the data.")


def step_module(config):
  """The module whose `make_train_step` trains `config.model.arch`: `train_step` (RS+EPM: CAM,
  RecurSeed, mixing), `puzzle_train_step` (the same network trained by config.method =
  "puzzlecam"), `affinity_train_step` (the boundary network of the random walk, on confident
  labels) or `seg_train_step` (the DeepLab networks on the masks of the train split, e.g. the
  pseudo labels of `data.train_mask_dir`)."""
  if config.model.arch == "rsepm" and config.method == "puzzlecam":
    return puzzle_train_step
  return {"rsepm": train_step, "affinity": affinity_train_step}.get(config.model.arch,
                                                                    seg_train_step)


@records.logs_bad_files
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, allow_config_change=False):
  """Trains per `config`, checkpointing to and resuming from `workdir`; returns final results.

  RS+EPM trains weakly supervised (`train_step`), the DeepLab networks fully supervised on the
  train split's masks (`seg_train_step`; `data.train_mask_dir` points them at pseudo labels).

  The config is validated before `workdir` is touched. A resume compares it with the config
  saved with the checkpoint and refuses changes of the network or the schedule (naming the
  keys) unless `allow_config_change`; see `config_check`.

  On a preemption notice (SIGTERM) every process saves at the same step and this returns
  `{"preempted_at_step": step}` instead; re-running the same command continues from there.
  """
  # ------------------------------------------------------------------ workdir and mesh
  config_check.validate(config)
  config_check.check_mode(config, "train")
  prepare_workdir(workdir)
  metric_writer.log_to_file(workdir)
  mesh = parallel.make_mesh()
  parallel.local_batch_size(config.train.global_batch_size, "config.train.global_batch_size")
  logging.info("Devices: %d over %d host(s); this is host %d.",
               jax.device_count(), jax.process_count(), jax.process_index())

  # ------------------------------------------------------------------ schedule, saved config
  steps_per_epoch, total_steps = schedule_lengths(config)
  parallel.wait_for_all_processes("checkpoint_manager")  # orbax's first sync is a collective
  manager = checkpoint.make_manager(workdir, max_to_keep=config.train.max_checkpoints)
  resume_step, differing = manager.latest_step(), []
  if resume_step is not None:  # before the input and the model: a refusal comes in seconds
    differing = checkpoint.check_config(manager, resume_step, config, True, allow_config_change,
                                        steps_per_epoch)
  write_config(workdir, config)

  # ------------------------------------------------------------------ input
  preflight.check_training_splits(config.data)  # every split, before the first step
  data_iter = parallel.DeviceBatches(
      pipeline.train_iterator(config.data, config.train.global_batch_size, config.seed), mesh,
      config.data.device_prefetch)

  # ------------------------------------------------------------------ model, optimiser, state
  model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
  tx = optimizer.make_optimizer(config.optim, total_steps)
  rng = state_lib.prng_key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = state_lib.create_train_state(model, tx, config, init_rng, mesh)

  # ------------------------------------------------------------------ checkpoint restore
  if resume_step is not None:
    parallel.wait_for_all_processes("train_state_ready")  # restore is a collective too
    logging.info("Resuming from checkpoint step %d in %s.", resume_step, workdir)
    state = checkpoint.restore(manager, resume_step, state, data_iter, differing)
  config_record = config_check.checkpoint_record(config, steps_per_epoch)
  start_step = int(state["step"])

  # ------------------------------------------------------------------ step and loop
  step_fn = step_module(config).make_train_step(model, tx, config, mesh, total_steps,
                                                 steps_per_epoch)
  writer = metric_writer.MetricWriter(workdir, start_step, config.train.tensorboard)
  # The pictures show RS+EPM's CAMs, seeds and mixed batch: none for the DeepLab networks.
  pictures = (visualize.TrainingPictures(model, config, mesh, steps_per_epoch)
              if config.model.arch == "rsepm" else None)
  progress = Progress(writer, total_steps, config.train.global_batch_size, start_step, data_iter)
  step_rng = parallel.replicate(step_rng, mesh)
  pending = []
  logging.info("Training steps %d..%d (%d per epoch).", start_step, total_steps, steps_per_epoch)
  with (preemption.PreemptionWatch() as watch, _name_lost_processes(manager),
        contextlib.closing(data_iter)):  # closed on errors too (grain workers)
    for step in range(start_step + 1, total_steps + 1):
      batch = next(data_iter)
      if step == start_step + 1:
        compile_start = time.time()
        logging.info("Compiling the train step (every phase at once; about a minute on a laptop CPU).")
        step_fn = parallel.compile_on_every_process(step_fn, state, batch, step_rng,
                                                    name="train_step")
        logging.info("Compiled in %.0f s.", time.time() - compile_start)
        progress.restart_clock()
      state, measurements = step_fn(state, batch, step_rng)
      pending.append((step, measurements))
      is_last = step == total_steps
      preempted = watch.reached(step)
      save_now = step % config.train.checkpoint_every == 0 or is_last or preempted
      if step % config.train.log_every == 0 or save_now:
        _check_finite(pending)
        progress.report(step, {k: float(v) for k, v in pending[-1][1].items()})
        pending = []
      if save_now:
        checkpoint.save(manager, step, state, data_iter, config_record, force=preempted)
      if preempted:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        logging.warning("Preempted at step %d: checkpoint saved; re-run the same command to "
                        "continue.", step)
        return {"preempted_at_step": step}
      if config.train.eval_every and step % config.train.eval_every == 0 and not is_last:
        if pictures:
          pictures.write(writer, step, state, batch, step_rng)
        _evaluate_and_report(model, state, config, mesh, workdir, step, writer)
  manager.wait_until_finished()
  _check_finite(pending)

  # ------------------------------------------------------------------ final evaluation
  if start_step < total_steps and pictures:
    pictures.write(writer, total_steps, state, batch, step_rng)
  results = _evaluate_and_report(model, state, config, mesh, workdir, total_steps, writer)
  writer.close()
  manager.close()
  write_done(workdir, total_steps, results)
  return results


@contextlib.contextmanager
def _name_lost_processes(manager):
  """On a multi-process run, says what a failed collective most likely means, then re-raises.

  A killed process shows up first as a collective error in the others ("connection reset by
  peer"); JAX's coordination service then names it ("Task K heartbeat timeout", task K =
  process K) and stops every process within RSEPM_HEARTBEAT_TIMEOUT seconds.
  """
  try:
    yield
  except jax.errors.JaxRuntimeError:
    if jax.process_count() > 1:
      logging.error(
          "A step failed inside a collective: another process has most likely died or lost its "
          "network. JAX's coordination service names it below ('Task K heartbeat timeout' = "
          "process K) within RSEPM_HEARTBEAT_TIMEOUT seconds and stops every process. Re-run the "
          "same command on every host to resume from checkpoint step %s.", manager.latest_step())
    raise


def write_done(workdir, step, results):
  """`workdir/done.json` (process 0): the run is complete; retry wrappers stop on it."""
  if jax.process_index() == 0:
    summary = {"step": int(step), **{f"{head}_miou": float(results[head]["miou"])
                                    for head in ("cam", "decoder") if head in results}}
    (epath.Path(workdir) / "done.json").write_text(json.dumps(summary, indent=2))


def _evaluate_and_report(model, state, config, mesh, workdir, step, writer):
  if config.model.arch == "affinity":  # no segmentation: the random walk scores its use
    return {}
  variables = state_lib.eval_variables(state, config.eval.use_ema)
  results = evaluate.evaluate(model, variables, config, mesh)
  evaluate.report(results, config, workdir, step)
  writer.write(step, {f"eval_{head}_miou": results[head]["miou"]
                      for head in ("cam", "decoder") if head in results})
  return results


def restore_for_inference(config, workdir, mesh, step=None, allow_config_change=False,
                          reads_data=True):
  """(model, evaluation variables, step) of the checkpoint `step` (default: latest) in `workdir`.

  `reads_data=False` (predict): the config needs no data set (`config_check.validate`).

  Network changes since the checkpoint are refused unless `allow_config_change` (`config_check`).
  A workdir without checkpoints and `config.model.init_from` set gives that file's whole model
  (an official checkpoint of `config.model.arch`, `convert.load_official`) as step 0.
  """
  config_check.validate(config, reads_data)
  parallel.wait_for_all_processes("inference_manager")  # orbax's first sync is a collective
  manager = checkpoint.make_manager(workdir)
  if step is None and not manager.all_steps() and config.model.init_from:
    manager.close()
    logging.info("No checkpoint in %s: using the weights of config.model.init_from=%s.",
                 workdir, config.model.init_from)
    model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
    variables = convert.load_official(config.model.init_from, config)
    return model, parallel.replicate(variables, mesh), 0
  step = checkpoint.resolve_step(manager, step)
  differing = checkpoint.check_config(manager, step, config, False, allow_config_change)
  model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
  # The restore target needs the optimiser state's structure and shapes, which the schedule's
  # length does not change: no need to read the train split.
  tx = optimizer.make_optimizer(config.optim, total_steps=1)
  target = state_lib.create_train_state(
      model, tx, config, state_lib.prng_key(0), mesh, pretrained=False)
  parallel.wait_for_all_processes("inference_state_ready")  # restore is a collective too
  state = checkpoint.restore(manager, step, target, differing=differing)
  manager.close()
  return model, state_lib.eval_variables(state, config.eval.use_ema), step


@records.logs_bad_files
def evaluate_checkpoint(config, workdir, step=None, allow_config_change=False):
  """`--mode=eval`: scores a saved checkpoint (the latest by default) without training."""
  config_check.check_mode(config, "eval")
  mesh = parallel.make_mesh()
  model, variables, step = restore_for_inference(config, workdir, mesh, step, allow_config_change)
  preflight.check_splits(config.data, evaluated=(config.data.eval_split,))
  metric_writer.log_to_file(workdir)
  if config.eval.protocol == "paper":
    results = paper_eval.evaluate(model, variables, config)
  else:
    results = evaluate.evaluate(model, variables, config, mesh)
  evaluate.report(results, config, workdir, step)
  logging.info("Results: %s", json.dumps({k: results[k]["miou"] for k in ("cam", "decoder", "paper")
                                          if k in results}))
  return results
