"""One orbax `CheckpointManager` for the train state and the grain iterator (jax_conventions 5.7).

Layout: `workdir/checkpoints/<step>/{state, data_iter}`. A step directory appears only once its
save has committed, so a crash mid-save leaves the previous checkpoint as the latest.
"""
import logging as py_logging

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA_ITER = "data_iter"


def _not_orbax_info(record):
  return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs():
  """Drops orbax's per-save INFO chatter from the console; warnings and errors still show."""
  logging.get_absl_handler().addFilter(_not_orbax_info)


def make_manager(workdir, save_interval_steps=1, max_to_keep=2):
  """CheckpointManager over `workdir/checkpoints` (created on process 0 if missing)."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(
      epath.Path(workdir) / "checkpoints", options=options, item_names=(STATE, DATA_ITER))


def save(manager, step, state, data_iter, force=False):
  """Saves the state and the iterator position together; returns whether a save started."""
  return manager.save(
      step,
      args=ocp.args.Composite(
          **{STATE: ocp.args.StandardSave(state), DATA_ITER: grain.checkpoint.CheckpointSave(data_iter)}),
      force=force)


def abstract_like(state):
  """ShapeDtypeStruct targets carrying the current shardings, so restore needs no topology match."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore(manager, step, state_like, data_iter=None):
  """Restores `step` onto the structure, shapes and shardings of `state_like`.

  With `data_iter`, the iterator is restored in place to the saved position too.
  """
  items = {STATE: ocp.args.StandardRestore(abstract_like(state_like))}
  if data_iter is not None:
    items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
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
