"""Preemption: a SIGTERM becomes a checkpoint at one step every process agrees on, then exit 0.

Spot/preemptible VMs and SLURM announce an eviction with SIGTERM. Multi-process runs use JAX's
preemption service (started by `jax.distributed.initialize`, see `parallel.py`): it catches the
signal in whichever process gets it, and `reached_preemption_sync_point(step)` turns true on
every process at the same step. A single process catches SIGTERM itself. The train loop asks
`reached(step)` once per step (a local flag check; no communication until a notice arrives).
"""
import signal

from absl import logging
import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """`reached(step)`: whether to save and stop after `step`. Use as a context manager."""

  def __init__(self):
    self._multi_process = jax.process_count() > 1
    self._signal = None
    self._previous_handler = None

  def __enter__(self):
    if not self._multi_process:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *unused_exc_info):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, unused_frame):
    if self._signal is None:
      logging.warning("Received %s: saving a checkpoint after the current step, then exiting.",
                      signal.Signals(signum).name)
    self._signal = signum

  def reached(self, step):
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signal is not None
