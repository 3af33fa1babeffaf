"""Continuing another run where it switched averaging on.

SGD, SNT-ASGD and dense ASGD take the same steps until averaging starts (their
SGD phase keeps no state, :attr:`selfish_jax.optim.OptimizerEntry.sgd_phase`).
A run that switched saves its state there (``WORKDIR/switch/``), and a run of
another such optimizer with the same config may start from it instead of
training those epochs again: :class:`ContinuationAtSwitch`, a
:class:`~selfish_jax.training.loop.Start` that the run setup hands to the loop
(experiments.compare forks its sweep cells with it).
"""

from __future__ import annotations

from typing import Any

from absl import logging
import ml_collections
import optax

from selfish_jax import optim
from selfish_jax.errors import ConfigError
from selfish_jax.training import metrics
from selfish_jax.training import workdir as workdir_lib
from selfish_jax.training.checkpoint import Checkpoints
from selfish_jax.training.core import SparseTraining
from selfish_jax.training.loop import Continuation
from selfish_jax.training.state import LoopState, TrainState

PyTree = Any


def forkable_optimizers() -> tuple[str, ...]:
  """The optimizers whose SGD phase keeps no state: a run of one can continue another's."""
  return tuple(name for name, entry in optim.OPTIMIZERS.items() if entry.sgd_phase)


def check_forkable(source: str, source_config: dict, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless ``config`` may continue the run in ``source``
  (whose config is ``source_config``)."""
  changed = workdir_lib.changed_keys(source_config, config, frozenset({'optimizer'}))
  if changed:
    raise ConfigError(f'cannot fork from {source}: its config differs in {", ".join(changed)}')
  for optimizer in (source_config.get('optimizer'), config.optimizer):
    if optimizer not in forkable_optimizers():
      raise ConfigError(f'cannot fork between optimizers other than {forkable_optimizers()}: '
                        f'{optimizer!r} has SGD-phase state')


def restore_at_switch(workdir: str, like: TrainState, tx: optax.GradientTransformation
                      ) -> Continuation | None:
  """The state, loop state and best weights so far of the run in ``workdir`` at
  the end of the epoch whose validation switched averaging on (no records), or
  None if it has not switched. ``like`` gives the state's structure; ``tx`` is
  the optimizer that run used."""
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    restored = checkpoints.restore_switch(like.replace(opt_state=tx.init(like.params)))
  finally:
    checkpoints.close()
  if restored is None:
    return None
  state, loop_json, best = restored
  return Continuation(state, LoopState.from_json(loop_json), [], best)


class ContinuationAtSwitch:
  """A new run's start: the run in ``source`` where it switched averaging on,
  continued with this run's optimizer (:meth:`SparseTraining.continue_after_switch`).

  The source's records up to the switch are copied (with the topology update
  the continuation made, if any), so the curves are complete, and so are its
  best weights so far, which the continuation's test reads unless it improves.
  """

  def __init__(self, source: str, config: ml_collections.ConfigDict):
    self.source = source
    self._config = config

  def __call__(self, state: TrainState, core: SparseTraining) -> Continuation:
    source_config = workdir_lib.read_config(self.source)
    if source_config is None:
      raise ConfigError(f'cannot fork from {self.source}: no config.json (not a run)')
    check_forkable(self.source, source_config, self._config)
    source_tx = optim.make_optimizer(source_config['optimizer'], self._config.lr)
    restored = restore_at_switch(self.source, state, source_tx)
    if restored is None:
      raise ConfigError(f'cannot fork from {self.source}: it has not switched averaging on '
                        '(no switch checkpoint yet)')
    epoch = restored.loop.epoch - 1
    state, moved = core.continue_after_switch(restored.state, epoch)
    records = [r for r in metrics.read_records(self.source) if r['step'] <= int(state.step)]
    if moved:
      records[-1] = {**records[-1], **core.mask_fields(state), 'topology_distance': moved}
    logging.info('Forked from %s at step %d (end of epoch %d) with optimizer %s.', self.source,
                 int(state.step), epoch, self._config.optimizer)
    return Continuation(state, restored.loop, records, restored.best)
