"""Noticing preemption (SIGTERM) and Ctrl-C (SIGINT) at a training step every
process agrees on.

TPU maintenance events, SLURM's ``scancel`` and Kubernetes evictions send
SIGTERM and allow some seconds before killing the job. The training loop asks
:meth:`StopWatch.reached` after every step; when it says yes, the loop saves
its state at that step and stops. In a multi-process run JAX's preemption
service (started by ``jax.distributed.initialize``) takes SIGTERM, tells every
process, and picks one step at which all of them save; in a single process a
handler raises a flag. Ctrl-C is handled the same way in a single process: the
first saves at the next step and stops, a second interrupts at once
(``KeyboardInterrupt``).
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopWatch:
  """Whether the job was asked to stop, asked once per training step.

  Use as a context manager: in a single process, handlers for SIGTERM and
  SIGINT are installed on entry (from the main thread only; elsewhere nothing
  is installed) and the previous ones restored on exit.

  Attributes:
    signal: the signal that asked to stop (``signal.SIGTERM`` or
      ``signal.SIGINT``), or None.
  """

  def __init__(self):
    self._processes = jax.process_count()
    self.signal = None
    self._previous = {}

  def __enter__(self) -> 'StopWatch':
    if self._processes == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _on_signal(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.signal == signal.SIGINT:
      raise KeyboardInterrupt  # Ctrl-C twice: stop now
    self.signal = self.signal or signum

  def reached(self, step: int) -> bool:
    """True at the step where this process (and every other) should save and stop."""
    if self._processes > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal = signal.SIGTERM
    return self.signal is not None
