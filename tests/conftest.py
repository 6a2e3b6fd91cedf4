"""Test set-up: 8 simulated CPU devices and parsed absl flags, before anything touches JAX."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Threefry draws compile ~5x faster unpartitioned on CPU; only test random streams change.
jax.config.update("jax_threefry_partitionable", False)
# grain reads absl flags; outside absl.app they must be marked parsed.
flags.FLAGS(sys.argv[:1], known_only=True)
flags.FLAGS.mark_as_parsed()
