"""Devices, the 1-D "data" mesh and host-to-global batches (jax_conventions.md 5.2, 5.9)."""
import collections
import json
import os
import time

from absl import logging
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp

DATA_AXIS = "data"


def maybe_initialize_distributed():
  """Calls `jax.distributed.initialize()` once, on multi-host launches only.

  A launcher sets `RSEPM_DISTRIBUTED=1` on every host (see launch/); on a single host the call
  is skipped so a laptop run needs no coordinator. TPU pods and SLURM are auto-detected; other
  clusters pass `RSEPM_COORDINATOR` (host:port), `RSEPM_NUM_PROCESSES` and `RSEPM_PROCESS_ID`.

  Timeouts, in seconds: `RSEPM_INIT_TIMEOUT` (900) to wait for every process to join,
  `RSEPM_HEARTBEAT_TIMEOUT` (100) after which a silent process is declared lost and the others
  stop with an error naming it, `RSEPM_SHUTDOWN_TIMEOUT` (300) to wait for the others at exit.
  The initialisation also starts JAX's preemption service: a SIGTERM to any process becomes a
  checkpoint of every process at the same step (see `preemption.py`).
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
      initialization_timeout=_seconds("RSEPM_INIT_TIMEOUT", 900),
      heartbeat_timeout_seconds=_seconds("RSEPM_HEARTBEAT_TIMEOUT", 100),
      shutdown_timeout_seconds=_seconds("RSEPM_SHUTDOWN_TIMEOUT", 300),
      **explicit)


def _seconds(name, default):
  value = os.environ.get(name, str(default))
  try:
    seconds = int(value)
  except ValueError:
    seconds = -1
  if seconds <= 0:
    raise ValueError(f"Environment variable {name}={value!r}: expected a positive number of seconds.")
  return seconds


def wait_for_all_processes(name):
  """Blocks until every process reaches the barrier `name` (no-op on a single process).

  Waits at most `RSEPM_INIT_TIMEOUT` seconds, through the coordination service, not a
  collective: collectives (gloo on CPU) are set up when all processes first reach them and
  give up on a process more than 30 s late, as after a slower compilation.
  """
  if jax.process_count() > 1:
    timeout_s = _seconds("RSEPM_INIT_TIMEOUT", 900)
    ocp.multihost.get_barrier_sync_fn()(key=f"rsepm_{name}", timeout_ms=1000 * timeout_s)


def compile_on_every_process(jitted, *args, name):
  """`jitted.lower(*args).compile()`, returned once every process has compiled it too."""
  compiled = jitted.lower(*args).compile()
  wait_for_all_processes(f"compiled_{name}")
  return compiled


def make_mesh():
  """A 1-D mesh over every device of every host, with an Auto axis named "data"."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def replicate(tree, mesh):
  """Puts a pytree that every host holds identically (params, PRNG keys) on all devices.

  Unlike `jax.device_put`, works when the mesh spans other hosts' devices: each host supplies
  its own copy, nothing is compared or sent between hosts. Typed PRNG keys travel as their
  key data.
  """
  sharding = replicated(mesh)

  def put(leaf):
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      data = put(jax.random.key_data(leaf))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

  return jax.tree.map(put, tree)


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


class DeviceBatches:
  """Global batches from a host iterator, with the next `depth - 1` already on their way.

  Copies to the devices are asynchronous, so while the step runs on batch k the batches after
  it are being read and transferred. `get_state`/`set_state` are those of the position of the
  batches handed out, not of the ones read ahead: grain's checkpoint handler, given this
  object, saves where training is. `wait_seconds` accumulates the time spent waiting for the
  host iterator (the input pipeline).
  """

  def __init__(self, host_iterator, mesh, depth=2):
    if depth < 1:
      raise ValueError(f"config.data.device_prefetch={depth}: expected at least 1.")
    self._iterator = host_iterator
    self._mesh = mesh
    self._depth = depth
    self._queue = collections.deque()
    self._state = host_iterator.get_state()
    self.wait_seconds = 0.0

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) < self._depth:
      start = time.perf_counter()
      host_batch = next(self._iterator)
      self.wait_seconds += time.perf_counter() - start
      self._queue.append((to_global(host_batch, self._mesh), self._iterator.get_state()))
    batch, self._state = self._queue.popleft()
    return batch

  # grain's checkpoint handler stores the state of iterators other than its own as bytes.
  def get_state(self):
    return json.dumps(self._state).encode()

  def set_state(self, state):
    self._state = json.loads(state)
    self._iterator.set_state(self._state)
    self._queue.clear()

  def start_prefetch(self):
    """Called by grain's checkpoint handler after a restore; reading resumes on `next`."""

  def close(self):
    self._queue.clear()
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
