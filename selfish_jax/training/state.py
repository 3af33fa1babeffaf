"""What a run checkpoints: the device state (:class:`TrainState`) and the epoch
loop's state (:class:`LoopState`, plain Python numbers saved as JSON beside it).

Everything a resumed run needs to continue as if it had never stopped is in
these two: the loop state keeps even the losses of the logging interval and
the epoch in progress, so the records after a resume are the uninterrupted
run's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import flax.struct
import jax
import optax

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes on the devices during training, as one pytree.

  Attributes:
    step: global training step (int32).
    params: model parameters, zero wherever their mask is False.
    masks: boolean masks beside ``params`` (``None`` for dense leaves).
    opt_state: optimizer state (SNT-ASGD averages and counters included).
    carry: the recurrent state carried from one BPTT window to the next.
    method_state: what the sparse method carries between updates (DSR's threshold).
    ever_active: masks of the weights active at any point so far (the ITOP rate's).
    gradients: the gradient the latest training step computed, kept only for
      methods that grow by gradient (None otherwise): what their next
      topology update ranks, as the reference reads ``weight.grad``.
  """
  step: jax.Array
  params: PyTree
  masks: PyTree
  opt_state: optax.OptState
  carry: PyTree
  method_state: PyTree
  ever_active: PyTree
  gradients: PyTree = None


def add_exactly(partials: list[float], values: Iterable[float]) -> list[float]:
  """``partials`` (non-overlapping floats whose exact sum is a running total,
  Shewchuk's algorithm as in :func:`math.fsum`) with ``values`` added.

  ``math.fsum(partials)`` is then the correctly rounded total however the
  values were split into calls, so a run resumed in the middle of an epoch
  reports the same mean loss as one that never stopped.
  """
  partials = list(partials)
  for x in values:
    kept = 0
    for y in partials:
      if abs(x) < abs(y):
        x, y = y, x
      high = x + y
      low = y - (high - x)
      if low:
        partials[kept] = low
        kept += 1
      x = high
    partials[kept:] = [x]
  return partials


@dataclasses.dataclass
class LoopState:
  """The epoch loop's state, checkpointed as JSON beside the :class:`TrainState`."""
  epoch: int = 1  # the epoch in progress
  window: int = 0  # batches of this epoch already trained
  val_losses: list = dataclasses.field(default_factory=list)  # SGD-phase history
  best_val_loss: float = math.inf
  best_step: int | None = None  # where the best weights were saved (None: not yet)
  # This epoch's checked training losses: their exact sum (add_exactly) and count.
  train_loss_partials: list = dataclasses.field(default_factory=list)
  train_loss_count: int = 0
  # The checked training losses of the logging interval in progress.
  interval_losses: list = dataclasses.field(default_factory=list)

  @property
  def train_loss(self) -> float:
    """The epoch's mean training loss so far."""
    return math.fsum(self.train_loss_partials) / max(self.train_loss_count, 1)

  def add_train_losses(self, values: list[float]) -> None:
    self.train_loss_partials = add_exactly(self.train_loss_partials, values)
    self.train_loss_count += len(values)
    self.interval_losses.extend(values)

  def next_epoch(self) -> None:
    self.epoch, self.window = self.epoch + 1, 0
    self.train_loss_partials, self.train_loss_count = [], 0

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d['best_val_loss'] = None if math.isinf(self.best_val_loss) else self.best_val_loss
    return d

  @classmethod
  def from_json(cls, d: dict) -> 'LoopState':
    d = dict(d)
    d['best_val_loss'] = math.inf if d['best_val_loss'] is None else d['best_val_loss']
    if 'train_loss_sum' in d:  # written before the sum was kept exactly
      total = d.pop('train_loss_sum')
      d['train_loss_partials'] = [total] if total else []
    return cls(**d)
