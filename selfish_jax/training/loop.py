"""The epoch loop every task trains with: one :class:`Run` per workdir.

Per epoch, as the reference does: train on every batch (the core's step-level
topology updates between steps); validate on the weights the optimizer says
(the averages once SNT-ASGD is on) and keep the best; end the epoch through
:meth:`SparseTraining.end_epoch` (switch, topology update, restarts); write
the epoch record; checkpoint.

A workdir survives any kill. One run at a time holds it (a second is refused,
naming the holder). The checkpoint is every transition's commit point (see
:mod:`~selfish_jax.training.checkpoint`): a run resumes from its latest
checkpoint that can be read, also in the middle of an epoch or of a logging
interval, discards whatever was written after it (records, best weights, a
switch checkpoint), and ends with the uninterrupted run's records; a run that
restores nothing starts its records over. SIGTERM and Ctrl-C save the state at
the next step and stop (:class:`~selfish_jax.errors.Preempted`). A non-finite
loss or non-finite parameters stop the run before anything of them is saved,
and a full disk stops it with one line; in both cases what was saved before
stays, and the same command resumes from it.

A task supplies a :class:`Task`: its batches, its train step and its
evaluation. The run setup (:mod:`selfish_jax.training.setup`) builds the
core, takes the workdir's lock, writes its config and hands the loop only what
it reads (:class:`LoopSettings`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import signal
import time
from typing import Any, NamedTuple, Protocol

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from selfish_jax import storage
from selfish_jax.errors import Preempted, TrainingDiverged, WorkdirError
from selfish_jax.training import metrics
from selfish_jax.training import workdir as workdir_lib
from selfish_jax.training.checkpoint import KEEP, Checkpoints
from selfish_jax.training.core import SparseTraining
from selfish_jax.training.metrics import MetricWriter
from selfish_jax.training.preemption import StopWatch
from selfish_jax.training.state import LoopState, TrainState

PyTree = Any


class Batches(Protocol):
  """One epoch's training batches, the same ones again when the epoch is resumed."""

  def __len__(self) -> int:
    """How many batches the epoch trains on."""

  def __getitem__(self, index: int) -> Any:
    """Batch ``index`` as the task's ``train_step`` takes it (on its devices)."""

  def tokens(self, index: int) -> int:
    """The real tokens (words) of batch ``index``: what tokens/s counts."""


class Task(Protocol):
  """What the loop needs of a task (language modelling, classification)."""

  def epoch_batches(self, epoch: int) -> Batches:
    """The training batches of ``epoch`` (1-based)."""

  def begin_epoch(self, state: TrainState) -> TrainState:
    """The state an epoch starts from (a language model resets its carry)."""

  def train_step(self, state: TrainState, batch: Any) -> tuple[TrainState, jax.Array]:
    """One optimizer step: the new state and the batch's loss (on the device)."""

  def evaluate(self, weights: PyTree) -> tuple[float, dict]:
    """``(loss, record fields)`` on the held-out split: the loss drives the best
    weights and the trigger; the fields go into the epoch record."""

  def summary(self, fields: dict) -> str:
    """The epoch line's account of :meth:`evaluate`'s fields."""


class Continuation(NamedTuple):
  """Where a new run starts instead of its fresh state: the state, loop state,
  records and best weights (None: none yet) of another run it continues."""
  state: TrainState
  loop: LoopState
  records: list[dict]
  best: PyTree | None


class Start(Protocol):
  """A new run's starting point other than its fresh state
  (:class:`~selfish_jax.training.continuation.ContinuationAtSwitch`)."""

  def __call__(self, state: TrainState, core: SparseTraining) -> Continuation:
    """Given the fresh state (its structure and placement) and the run's core."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """What the loop reads of a run's config."""
  num_epochs: int
  log_every: int = 200  # steps between progress records
  checkpoint_every_steps: int = 0  # 0: at the end of each epoch only


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else (
      f'{seconds // 60}m{seconds % 60:02d}s')


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
  """One fused reduction: whether every floating entry of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class Run:
  """A run in ``workdir``: opened (new, resumed, or from ``start``), trained, finished.

  Use as a context manager: it holds the workdir's lock (taken by the run
  setup before anything was built) and the SIGTERM and Ctrl-C handlers until
  the block ends (:meth:`close`). A signal that arrives after training (in the
  test) lets the test finish and its record be written.

  Args:
    workdir: where checkpoints and ``metrics.jsonl`` live (a local folder or URL),
      holding this run's ``config.json`` already.
    core: the run's sparse-training core.
    state: the fresh state, placed as the run keeps it (its shardings).
    settings: the epochs, and how often to log and checkpoint.
    lock: the workdir's lock, released by :meth:`close`.
    description: the start line's account of the task and model.
    start: a new run's starting point other than ``state``.
  """

  def __init__(self, workdir: str, core: SparseTraining, state: TrainState, *,
               settings: LoopSettings, lock: workdir_lib.WorkdirLock, description: str,
               start: Start | None = None):
    self.workdir, self.core, self.settings = workdir, core, settings
    self.checkpoints = self.writer = None
    self._saved_step = None
    self._pending = []  # (step, loss on the device) not yet checked for divergence
    # The best weights each kept checkpoint names (the older is the fallback's).
    self._named_best = collections.deque(maxlen=KEEP)
    self._lock = lock
    self._stop = StopWatch().__enter__()
    try:
      with self._out_of_space():
        self._open(state, description, start)
    except BaseException:
      self.close()
      raise

  def _open(self, state: TrainState, description: str, start: Start | None) -> None:
    workdir, core = self.workdir, self.core
    self.checkpoints = Checkpoints(workdir)
    self.writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    self.loop = LoopState()
    restored = self.checkpoints.restore_latest(state)
    if restored is not None:
      state, loop_json = restored
      self.loop = LoopState.from_json(loop_json)
      if 'best_step' not in loop_json:  # a workdir from before the loop state named it
        self.loop.best_step = self.checkpoints.newest_best()
      self._saved_step = int(state.step)
      self._named_best.append(self.loop.best_step)
      self.checkpoints.discard_after(self._saved_step)
      self.writer.truncate_after(self._saved_step)
      logging.info('Resumed from %s at step %d (epoch %d, window %d).', workdir, int(state.step),
                   self.loop.epoch, self.loop.window)
    else:
      # Nothing committed: whatever an earlier start left is not part of this run.
      self.checkpoints.discard_after(-1)
      self.writer.truncate_after(-1)
      if start is not None:
        continued = start(state, core)
        state, self.loop = continued.state, continued.loop
        for record in continued.records:
          self.writer.write(record)
        self.loop.best_step = None
        self.state = state
        if continued.best is not None:
          self._save_best(int(state.step), continued.best)
        self._save_latest()
      else:
        logging.info('Start: %s; %s', description, core.describe(state))
    self.state = state

  def __enter__(self) -> 'Run':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # ------------------------------------------------------------------ checks and saves

  def _kept(self) -> str:
    if self._saved_step is None:
      return 'no checkpoint had been written'
    return (f'the checkpoint of step {self._saved_step} and the best weights in {self.workdir} '
            'are kept unchanged')

  def _diverged(self, what: str, step: int) -> TrainingDiverged:
    return TrainingDiverged(f'training diverged: {what} at step {step}; {self._kept()} '
                            '(a lower lr or a stronger clip may help)')

  @contextlib.contextmanager
  def _out_of_space(self):
    """Within: a full disk or quota stops the run with one line saying what is kept."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, WorkdirError) or not storage.is_out_of_space(e):
        raise
      reason = ' '.join(str(e).split())[:300]
      raise WorkdirError(f'no space left to write into {self.workdir} ({reason}); '
                         f'{self._kept()}: free some space and run the same command to '
                         'resume') from e

  def _check_losses(self) -> None:
    """Stops the run at the first NaN or inf training loss, before anything of it
    is saved; adds the checked losses to the epoch's and the interval's."""
    if not self._pending:
      return
    values = np.asarray(jax.device_get([loss for _, loss in self._pending]), np.float32)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      raise self._diverged(f'the training loss is {values[bad[0]]}', self._pending[bad[0]][0])
    self.loop.add_train_losses([float(v) for v in values])
    self._pending.clear()

  def _check_finite(self, what: str, tree: PyTree) -> None:
    if not bool(_all_finite(tree)):
      raise self._diverged(f'{what} are not finite', int(self.state.step))

  def _save_latest(self) -> None:
    """Commits the state: the losses and parameters are checked first."""
    self._check_losses()
    self._check_finite('the parameters', self.state.params)
    self.checkpoints.save_latest(int(self.state.step), self.state, self.loop.to_json())
    self._saved_step = int(self.state.step)
    self._named_best.append(self.loop.best_step)
    self.checkpoints.keep_best(self._named_best)

  def _save_best(self, step: int, weights: PyTree) -> None:
    self._check_finite('the weights to keep as the best', weights)
    self.checkpoints.save_best(step, weights)
    self.loop.best_step = step

  def _stopped(self, what: str) -> Preempted:
    """The exception that ends a run asked to stop, whose state of ``what`` is saved."""
    self.close()
    if self._stop.signal == signal.SIGINT:
      return Preempted(f'interrupted: the state of {what} is saved in {self.workdir}; run the '
                       'same command to resume', exit_status=130)
    return Preempted(f'preempted: the state of {what} is saved in {self.workdir}; run the same '
                     'command to resume')

  # ------------------------------------------------------------------ training

  def train(self, task: Task) -> None:
    """Trains the epochs left (none for a finished run)."""
    with self._out_of_space():
      self._train(task)

  def _train(self, task: Task) -> None:
    settings, core, loop = self.settings, self.core, self.loop
    step = int(self.state.step)  # kept on the host from here on: no device sync per step
    while loop.epoch <= settings.num_epochs:
      epoch = loop.epoch
      epoch_start = time.time()
      if loop.window == 0:
        self.state = task.begin_epoch(self.state)
      batches = task.epoch_batches(epoch)
      epoch_steps = len(batches)
      interval_start, interval_steps, interval_tokens, epoch_tokens = time.time(), 0, 0, 0
      for index in range(loop.window, epoch_steps):
        self.state, loss = task.train_step(self.state, batches[index])
        step += 1
        tokens = batches.tokens(index)
        interval_tokens += tokens
        epoch_tokens += tokens
        self.state = core.after_step(self.state, step)
        self._pending.append((step, loss))
        interval_steps += 1
        loop.window = index + 1
        if loop.window % settings.log_every == 0 or loop.window == epoch_steps:
          self._log_progress(epoch, epoch_steps, time.time() - interval_start, interval_steps,
                             interval_tokens)
          interval_start, interval_steps, interval_tokens = time.time(), 0, 0
        if (settings.checkpoint_every_steps
            and loop.window % settings.checkpoint_every_steps == 0 and loop.window < epoch_steps):
          self._save_latest()
        if self._stop.reached(step):
          self._save_latest()
          raise self._stopped(f'step {step} (epoch {epoch}, window {loop.window} of '
                              f'{epoch_steps})')
      self._check_losses()
      self._end_epoch(task, epoch, step, epoch_start, time.time() - epoch_start, epoch_tokens)
      if self._stop.signal is not None:  # arrived during the epoch end, now committed
        raise self._stopped(f'step {step} (the end of epoch {epoch})')

  def _log_progress(self, epoch, epoch_steps, elapsed, steps, tokens) -> None:
    self._check_losses()
    # The interval's losses are part of the loop state: a run resumed inside
    # the interval logs the mean an uninterrupted run logs.
    mean_loss = float(jnp.mean(jnp.asarray(self.loop.interval_losses, jnp.float32)))
    self.loop.interval_losses = []
    record = {'kind': metrics.TRAIN, 'step': int(self.state.step), 'epoch': epoch,
              'loss': mean_loss, 'ppl': perplexity(mean_loss),
              'ms_per_step': 1000 * elapsed / steps, 'tokens_per_s': tokens / elapsed}
    self.writer.write(record)
    left = (epoch_steps - self.loop.window) * elapsed / steps
    logging.info('| epoch %3d | %5d/%5d steps | loss %5.2f | ppl %8.2f | %6.1f ms/step | '
                 '%6.0f tokens/s | epoch left %s', epoch, self.loop.window, epoch_steps, mean_loss,
                 record['ppl'], record['ms_per_step'], record['tokens_per_s'], _duration(left))

  def _end_epoch(self, task, epoch, step, epoch_start, train_time, epoch_tokens) -> None:
    """Validation, the best weights, the core's epoch end and the record, then
    the commit: the checkpoint of ``step`` (see the module docstring)."""
    core, loop = self.core, self.loop
    weights = core.eval_weights(self.state)
    val_loss, fields = task.evaluate(weights)
    if not math.isfinite(val_loss):
      raise self._diverged(f'the validation loss is {val_loss}', step)
    improved = val_loss < loop.best_val_loss
    if improved:
      loop.best_val_loss = val_loss
      self._save_best(step, weights)
    self.state, end = core.end_epoch(self.state, loop.val_losses, epoch, step, val_loss)
    loop.val_losses = list(end.val_losses)
    masks = core.mask_fields(self.state)
    rates = core.rates(step)
    record = {'kind': metrics.EPOCH, 'step': step, 'epoch': epoch, **fields,
              'train_loss': loop.train_loss, 'optimizer': 'asgd' if end.averaging else 'sgd',
              **rates, 'epoch_time_s': time.time() - epoch_start,
              # Of this session's part of the epoch (all of it unless resumed mid-epoch).
              'train_tokens_per_s': epoch_tokens / max(train_time, 1e-9),
              **masks, 'topology_distance': end.topology_distance,
              'averaging_restarted': end.restarted}
    self.writer.write(record)
    logging.info('| end of epoch %3d | %6.1fs | %s | %s | density %.4f | ITOP %.4f%s%s', epoch,
                 record['epoch_time_s'], task.summary(fields), record['optimizer'],
                 masks['density'], masks['itop_rate'],
                 ''.join(f' | {k.replace("_", " ")} {v:.4f}' for k, v in rates.items()),
                 ' | best' if improved else '')
    for name, gates in masks['gate_density'].items():
      logging.info('    gate density %s: %s', name,
                   ' '.join(f'{g}={d:.3f}' for g, d in gates.items()))
    loop.next_epoch()
    if end.switched:
      self._check_finite('the parameters', self.state.params)
      self.checkpoints.save_switch(step, self.state, loop.to_json(), self.best_weights())
    self._save_latest()

  def best_weights(self) -> PyTree:
    """The weights that validated best (the current ones if none were saved)."""
    if self.loop.best_step is None:
      return self.state.params
    return self.checkpoints.restore_best(self.state.params, self.loop.best_step)

  def finish(self, final: dict) -> dict:
    """Writes the final record (once: a finished run started again adds none)
    and closes the run; returns ``final`` with its kind and step."""
    final = {'kind': metrics.FINAL, 'step': int(self.state.step), **final}
    with self._out_of_space():
      if metrics.final_record(self.workdir) is None:
        self.writer.write(final)
    if self._stop.signal is not None:
      logging.info('%s arrived after training; the test finished and the run is complete.',
                   signal.Signals(self._stop.signal).name)
    self.close()
    return final

  def close(self) -> None:
    """Closes the writer and checkpoints, restores the signal handlers and
    releases the workdir's lock (again: nothing)."""
    if self.writer is not None:
      self.writer.close()
      self.writer = None
    if self.checkpoints is not None:
      self.checkpoints.close()
      self.checkpoints = None
    self._stop.__exit__()
    self._lock.release()
