"""Devices, the 1-D "data" mesh and host-to-global batches (jax_conventions.md 5.2, 5.9)."""
import os

from absl import logging
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def maybe_initialize_distributed():
  """Calls `jax.distributed.initialize()` once, on multi-host launches only.

  A launcher sets `RSEPM_DISTRIBUTED=1` on every host (see launch/); on a single host the call
  is skipped so a laptop run needs no coordinator. TPU pods and SLURM are auto-detected; other
  clusters pass `RSEPM_COORDINATOR` (host:port), `RSEPM_NUM_PROCESSES` and `RSEPM_PROCESS_ID`.
  """
  if os.environ.get("RSEPM_DISTRIBUTED") != "1" or jax.distributed.is_initialized():
    return
  explicit = {}
  if "RSEPM_COORDINATOR" in os.environ:
    explicit = dict(coordinator_address=os.environ["RSEPM_COORDINATOR"],
                    num_processes=int(os.environ["RSEPM_NUM_PROCESSES"]),
                    process_id=int(os.environ["RSEPM_PROCESS_ID"]))
  logging.info("Initialising jax.distributed %s", explicit or "(auto-detected cluster)")
  jax.distributed.initialize(
      initialization_timeout=int(os.environ.get("RSEPM_INIT_TIMEOUT", 900)), **explicit)


def make_mesh():
  """A 1-D mesh over every device of every host, with an Auto axis named "data"."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharded(mesh):
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size, what="global_batch_size"):
  """This host's share of a global batch; fails clearly when it does not divide.

  The global batch must split evenly over every device (each device gets the same number of
  images), so it is independent of the device and host count, unlike `#GPUs x per-GPU` setups.
  """
  devices = jax.device_count()
  if global_batch_size <= 0 or global_batch_size % devices:
    raise ValueError(
        f"{what}={global_batch_size} does not divide over {devices} devices "
        f"({jax.process_count()} hosts x {jax.local_device_count()} local devices); "
        f"use a positive multiple of {devices}.")
  return global_batch_size // jax.process_count()


def to_global(host_batch, mesh):
  """Host-local numpy batch (leading axis = this host's share) -> global sharded jax arrays."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)
