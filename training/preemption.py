"""SIGTERM (a preemption notice on Cloud TPU, Kubernetes, SLURM) -> checkpoint now, exit cleanly.

On one host the handler only sets a flag that the loop reads after each step.
On several hosts the processes must agree on the step to save at, or the
collective save would deadlock: JAX's preemption sync point (set up by
jax.distributed.initialize, which catches SIGTERM itself) gives that step.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
  """A context that turns SIGTERM into `reached(step) -> True` at a step every host agrees on."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested
