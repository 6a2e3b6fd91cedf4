"""One orbax `CheckpointManager` for the train state and the grain iterator (jax_conventions 5.7).

Layout: `workdir/checkpoints/<step>/{state, data_iter, config}`. A step directory appears only
once its save has committed, so a crash mid-save leaves the previous checkpoint as the latest.
`config` (JSON, `config_check.checkpoint_record`) is what a resume or an evaluation compares its
config with; checkpoints written before it existed restore without it.
"""
import logging as py_logging
import os

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from rsepm_jax import config_check

STATE = "state"
DATA_ITER = "data_iter"
CONFIG = "config"


def _not_orbax_info(record):
  return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs():
  """Drops orbax's per-save INFO chatter from the console; warnings and errors still show."""
  logging.get_absl_handler().addFilter(_not_orbax_info)


def make_manager(workdir, save_interval_steps=1, max_to_keep=2):
  """CheckpointManager over `workdir/checkpoints` (created on process 0 if missing).

  A relative local `workdir` is made absolute first (orbax refuses relative paths).
  """
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, create=True)
  directory = epath.Path(workdir) / "checkpoints"
  if "://" not in str(workdir):
    directory = epath.Path(os.path.abspath(directory))
  return ocp.CheckpointManager(directory, options=options, item_names=(STATE, DATA_ITER, CONFIG))


def save(manager, step, state, data_iter, config_record=None, force=False):
  """Saves the state, the iterator position and `config_record` together; returns whether a
  save started."""
  items = {STATE: ocp.args.StandardSave(state), DATA_ITER: grain.checkpoint.CheckpointSave(data_iter)}
  if config_record is not None:
    items[CONFIG] = ocp.args.JsonSave(config_record)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(state):
  """ShapeDtypeStruct targets carrying the current shardings, so restore needs no topology match."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def saved_config(manager, step):
  """The config record saved with `step`, or None for a checkpoint saved without one."""
  if not (epath.Path(manager.directory) / str(step) / CONFIG).exists():
    return None
  return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]


def check_config(manager, step, config, training, allow_change, steps_per_epoch=None):
  """Compares `config` with the one saved with `step` (`config_check.check_saved`).

  Raises `ConfigError` for a refused change; returns the differences it let through (for
  `restore` to name), empty for a checkpoint saved without its config (a warning says so).
  """
  where = f"checkpoint step {step} in {manager.directory}"
  saved = saved_config(manager, step)
  if saved is None:
    logging.warning("%s was saved without its config (an older version); the config cannot be "
                    "compared with it.", where)
    return []
  return config_check.check_saved(saved, config, where, training, allow_change, steps_per_epoch)


def restore(manager, step, state_like, data_iter=None, differing=()):
  """Restores `step` onto the structure, shapes and shardings of `state_like`.

  With `data_iter`, the iterator is restored in place to the saved position too. A saved state
  that does not fit `state_like` is a `ConfigError` naming `differing` (from `check_config`).
  """
  items = {STATE: ocp.args.StandardRestore(abstract_like(state_like))}
  if data_iter is not None:
    items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError) as error:
    changed = (f"these config keys differ from the saved ones:\n"
               f"{config_check.format_differences(differing)}" if differing else
               "check model.* and data.num_classes against the config it was trained with")
    raise config_check.ConfigError(
        f"The parameters of checkpoint step {step} in {manager.directory} do not fit the model "
        f"of this config; {changed}\n(orbax: {str(error).splitlines()[0][:300]})") from error
  return restored[STATE]


def resolve_step(manager, step=None):
  """`step` if it was saved, else the latest; a clear error when there is nothing to load."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoint found in {manager.directory}.")
  if step is None:
    return manager.latest_step()
  if step not in steps:
    raise FileNotFoundError(
        f"Checkpoint step {step} not found in {manager.directory}; available steps: {sorted(steps)}.")
  return step
