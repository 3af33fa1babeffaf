"""The epoch loop every task trains with: one :class:`Run` per workdir.

Per epoch, as the reference does: train on every batch (the core's step-level
topology updates between steps); validate on the weights the optimizer says
(the averages once SNT-ASGD is on) and keep the best; end the epoch through
:meth:`SparseTraining.end_epoch` (switch, topology update, restarts); write
the epoch record; checkpoint. A run resumes from its latest checkpoint, also
in the middle of an epoch, to the same numbers; SIGTERM saves the state and
stops (:class:`~selfish_jax.errors.Preempted`); a non-finite loss stops the
run before anything of it is saved.

A task supplies a :class:`Task`: its batches, its train step and its
evaluation. Everything else is here and in :mod:`selfish_jax.training.core`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Protocol

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from selfish_jax.errors import Preempted, TrainingDiverged
from selfish_jax.training import metrics
from selfish_jax.training import workdir as workdir_lib
from selfish_jax.training.checkpoint import Checkpoints
from selfish_jax.training.core import HostState, SparseTraining, check_resumable
from selfish_jax.training.metrics import MetricWriter
from selfish_jax.training.preemption import PreemptionWatch
from selfish_jax.training.steps import TrainState

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


# Given the fresh state and the core, the state, host state, records and best
# weights so far (None: none) a new run starts from instead (a continuation of
# another run: experiments/compare.py).
Start = Callable[[TrainState, SparseTraining],
                 tuple[TrainState, HostState, list[dict], PyTree | None]]


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else (
      f'{seconds // 60}m{seconds % 60:02d}s')


class Run:
  """A run in ``workdir``: opened (new, resumed, or from ``start``), trained, finished.

  Args:
    config: the run's config (saved as ``config.json``; a resume must match it
      but for :data:`~selfish_jax.training.core.RESUMABLE_CHANGES`). The loop
      reads ``num_epochs``, ``log_every`` and ``checkpoint_every_steps``.
    workdir: where checkpoints and ``metrics.jsonl`` live (a local folder or URL).
    core: the run's sparse-training core.
    state: the fresh state, placed as the run keeps it (its shardings).
    description: the start line's account of the task and model.
    start: a new run's starting point other than ``state``.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, core: SparseTraining,
               state: TrainState, *, description: str, start: Start | None = None):
    self.config, self.workdir, self.core = config, workdir, core
    workdir_lib.open_workdir(workdir, workdir_lib.as_saved(config),
                             lambda saved: check_resumable(saved, config))
    self.checkpoints = Checkpoints(workdir)
    self.writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    self.host = HostState()
    restored = self.checkpoints.restore_latest(state)
    if restored is not None:
      state, host_json = restored
      self.host = HostState.from_json(host_json)
      self.writer.truncate_after(int(state.step))
      logging.info('Resumed from %s at step %d (epoch %d, window %d).', workdir, int(state.step),
                   self.host.epoch, self.host.window)
    elif start is not None:
      state, self.host, records, best = start(state, core)
      self.writer.truncate_after(-1)  # a start interrupted before its checkpoint starts over
      for record in records:
        self.writer.write(record)
      if best is not None:
        self.checkpoints.save_best(self.host.epoch - 1, best)
      self.checkpoints.save_latest(int(state.step), state, self.host.to_json())
    else:
      logging.info('Start: %s; %s', description, core.describe(state))
    self.state = state
    self._saved_step = self.checkpoints.latest_step()
    self._unchecked = []  # (step, loss on the device) not yet checked for divergence

  def _diverged(self, what: str, value: float, step: int) -> TrainingDiverged:
    kept = (f'the checkpoint of step {self._saved_step} and the best weights in {self.workdir} '
            'are kept unchanged' if self._saved_step is not None
            else 'no checkpoint had been written')
    return TrainingDiverged(f'training diverged: {what} is {value} at step {step}; {kept} '
                            '(a lower lr or a stronger clip may help)')

  def _check_losses(self) -> None:
    """Stops the run at the first NaN or inf training loss, before anything of it
    is saved; adds the checked losses to the epoch's sum."""
    if not self._unchecked:
      return
    values = np.asarray(jax.device_get([loss for _, loss in self._unchecked]), np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      raise self._diverged('the training loss', values[bad[0]], self._unchecked[bad[0]][0])
    self.host.train_loss_sum = math.fsum([self.host.train_loss_sum, *values])
    self.host.train_loss_count += len(values)
    self._unchecked.clear()

  def _save_latest(self) -> None:
    self._check_losses()
    self.checkpoints.save_latest(int(self.state.step), self.state, self.host.to_json())
    self._saved_step = int(self.state.step)

  def train(self, task: Task) -> None:
    """Trains the epochs left (none for a finished run)."""
    config, core, host = self.config, self.core, self.host
    step = int(self.state.step)  # kept on the host from here on: no device sync per step
    # SIGTERM (TPU maintenance, scancel, eviction): save at a step and stop.
    with PreemptionWatch() as preemption:
      while host.epoch <= config.num_epochs:
        epoch = host.epoch
        epoch_start = time.time()
        if host.window == 0:
          self.state = task.begin_epoch(self.state)
        batches = task.epoch_batches(epoch)
        epoch_steps = len(batches)
        losses, interval_start, interval_steps, interval_tokens = [], time.time(), 0, 0
        epoch_tokens = 0
        for index in range(host.window, epoch_steps):
          self.state, loss = task.train_step(self.state, batches[index])
          step += 1
          tokens = batches.tokens(index)
          interval_tokens += tokens
          epoch_tokens += tokens
          self.state = core.after_step(self.state, step)
          losses.append(loss)
          self._unchecked.append((step, loss))
          interval_steps += 1
          host.window = index + 1
          if host.window % config.log_every == 0 or host.window == epoch_steps:
            self._check_losses()
            self._log_progress(epoch, epoch_steps, losses, time.time() - interval_start,
                               interval_steps, interval_tokens)
            losses, interval_start, interval_steps, interval_tokens = [], time.time(), 0, 0
          if (config.checkpoint_every_steps and host.window % config.checkpoint_every_steps == 0
              and host.window < epoch_steps):
            self._save_latest()
          if preemption.reached(step):
            self._save_latest()
            self.close()
            raise Preempted(f'preempted: the state of step {step} (epoch {epoch}, window '
                            f'{host.window} of {epoch_steps}) is saved in {self.workdir}; run '
                            'the same command to resume')
        self._check_losses()
        self._end_epoch(task, epoch, step, epoch_start, time.time() - epoch_start, epoch_tokens)

  def _log_progress(self, epoch, epoch_steps, losses, elapsed, steps, tokens) -> None:
    mean_loss = float(jnp.mean(jnp.stack(losses)))
    record = {'kind': metrics.TRAIN, 'step': int(self.state.step), 'epoch': epoch,
              'loss': mean_loss, 'ppl': perplexity(mean_loss),
              'ms_per_step': 1000 * elapsed / steps, 'tokens_per_s': tokens / elapsed}
    self.writer.write(record)
    left = (epoch_steps - self.host.window) * elapsed / steps
    logging.info('| epoch %3d | %5d/%5d steps | loss %5.2f | ppl %8.2f | %6.1f ms/step | '
                 '%6.0f tokens/s | epoch left %s', epoch, self.host.window, epoch_steps, mean_loss,
                 record['ppl'], record['ms_per_step'], record['tokens_per_s'], _duration(left))

  def _end_epoch(self, task, epoch, step, epoch_start, train_time, epoch_tokens) -> None:
    core, host = self.core, self.host
    weights = core.eval_weights(self.state)
    val_loss, fields = task.evaluate(weights)
    if not math.isfinite(val_loss):
      raise self._diverged('the validation loss', val_loss, step)
    improved = val_loss < host.best_val_loss
    if improved:
      host.best_val_loss = val_loss
      self.checkpoints.save_best(epoch, weights)
    self.state, end = core.end_epoch(self.state, host, epoch, step, val_loss)
    masks = core.mask_fields(self.state)
    rates = core.rates(step)
    train_loss = host.train_loss_sum / max(host.train_loss_count, 1)
    record = {'kind': metrics.EPOCH, 'step': step, 'epoch': epoch, **fields,
              'train_loss': train_loss, 'optimizer': 'asgd' if end.averaging else 'sgd',
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
    host.epoch, host.window = epoch + 1, 0
    host.train_loss_sum, host.train_loss_count = 0.0, 0
    self._save_latest()
    if end.switched:
      self.checkpoints.save_switch(step, self.state, host.to_json(), self.best_weights())

  def best_weights(self) -> PyTree:
    """The weights that validated best (the current ones if none were saved)."""
    best = self.checkpoints.restore_best(self.state.params)
    return self.state.params if best is None else best

  def finish(self, final: dict) -> dict:
    """Writes the final record (once: a finished run started again adds none)
    and closes the run; returns ``final`` with its kind and step."""
    final = {'kind': metrics.FINAL, 'step': int(self.state.step), **final}
    if metrics.final_record(self.workdir) is None:
      self.writer.write(final)
    self.close()
    return final

  def close(self) -> None:
    self.writer.close()
    self.checkpoints.close()
