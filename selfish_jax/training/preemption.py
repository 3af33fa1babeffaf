"""Noticing preemption (SIGTERM) at a training step every process agrees on.

TPU maintenance events, SLURM's ``scancel`` and Kubernetes evictions send
SIGTERM and allow some seconds before killing the job. The training loop asks
:meth:`PreemptionWatch.reached` after every step; when it says yes, the loop
saves its state at that step and stops. In a multi-process run JAX's
preemption service (started by ``jax.distributed.initialize``) takes the
signal, tells every process, and picks one step at which all of them save;
in a single process a SIGTERM handler raises a flag.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """Whether the job is being preempted, asked once per training step.

  Use as a context manager: a single process's SIGTERM handler is installed on
  entry (from the main thread only; elsewhere nothing is installed) and the
  previous one restored on exit.
  """

  def __init__(self):
    self._processes = jax.process_count()
    self._signalled = False
    self._previous = None

  def __enter__(self) -> 'PreemptionWatch':
    if self._processes == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    """True at the step where this process (and every other) should save and stop."""
    if self._processes > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled
