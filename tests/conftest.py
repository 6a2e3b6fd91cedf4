"""Test set-up: 8 simulated CPU devices and parsed absl flags, before anything touches JAX."""
import os
import sys
import tempfile

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
