"""Test set-up: 8 simulated CPU devices and parsed absl flags, before anything touches JAX."""
import os
import sys
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Threefry draws compile ~5x faster unpartitioned on CPU; only test random streams change.
jax.config.update("jax_threefry_partitionable", False)
# Test models are tiny: compile time dominates, so spend less of it optimising.
jax.config.update("jax_disable_most_optimizations", True)
# Identical programs (the smoke train step in several end-to-end tests) compile once per run.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "rsepm_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
# grain reads absl flags; outside absl.app they must be marked parsed.
flags.FLAGS(sys.argv[:1], known_only=True)
flags.FLAGS.mark_as_parsed()


@pytest.fixture
def save_untrained_checkpoint():
  """`save(config, workdir, step)`: an Orbax checkpoint of a freshly initialised train state
  (with its data position) in `workdir`, for tests of eval, export and predict."""
  from rsepm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from rsepm_jax import optimizer  # pylint: disable=g-import-not-at-top
  from rsepm_jax import parallel  # pylint: disable=g-import-not-at-top
  from rsepm_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from rsepm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  def save(config, workdir, step):
    mesh = parallel.make_mesh()
    model = state_lib.build_model(config, bn_axis_name=parallel.DATA_AXIS)
    tx = optimizer.make_optimizer(config.optim, total_steps=8)
    state = state_lib.create_train_state(model, tx, config, state_lib.prng_key(0), mesh)
    manager = checkpoint.make_manager(workdir)
    checkpoint.save(manager, step, state, pipeline.train_iterator(config.data, 8, seed=0))
    manager.wait_until_finished()
    manager.close()
  return save
