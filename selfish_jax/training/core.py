"""The sparse-training core: what every task's training shares.

A :class:`SparseTraining` holds one run's method and optimizer and applies the
transitions of Selfish-RNN training to a :class:`~selfish_jax.training.steps.TrainState`:
the initial masked state, the step-level topology updates (RigL, GMP), the
epoch end (SNT-ASGD's switch by the non-monotone trigger, the epoch-end
topology update, averaging restarts), the weights to evaluate and what an
epoch record says about the masks. :func:`restore_at_switch` gives back a
run's state where it switched averaging on. The epoch loop that calls these
(checkpoints, resume, preemption, records) is :mod:`selfish_jax.training.loop`;
a task (language modelling, classification) supplies only its batches, train
step and evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from selfish_jax import config as config_lib
from selfish_jax import optim, sparsity
from selfish_jax.sparsity import methods
from selfish_jax.training import workdir as workdir_lib
from selfish_jax.training.checkpoint import Checkpoints
from selfish_jax.training.state import HostState, TrainState

PyTree = Any

# Keys that may change when a run is resumed: they do not change its results.
RESUMABLE_CHANGES = frozenset({'data_dir', 'download', 'download_url', 'log_every',
                               'checkpoint_every_steps', 'num_devices'})


def changed_keys(saved: dict, config: ml_collections.ConfigDict,
                 may_change: frozenset[str] = frozenset()) -> list[str]:
  """The keys, sorted, in which ``config`` differs from a saved ``config.json``
  and that would change a run's results (neither in :data:`RESUMABLE_CHANGES`
  nor in ``may_change``)."""
  current = workdir_lib.as_saved(config)
  ignored = RESUMABLE_CHANGES | may_change
  return sorted(k for k in set(saved) | set(current)
                if k not in ignored and saved.get(k) != current.get(k))


def check_resumable(saved: dict, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError if ``config`` differs from a workdir's saved config in a key that matters."""
  changed = changed_keys(saved, config)
  if changed:
    current = workdir_lib.as_saved(config)
    details = ', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in changed)
    raise config_lib.ConfigError(f'the workdir holds a run with a different config ({details}); '
                                 'use a new workdir or the same settings')


def nonmonotone_trigger(previous_losses: Sequence[float], loss: float, nonmono: int) -> bool:
  """NT-ASGD's switch: ``len(L) > nonmono and loss > min(L[:-nonmono])``.

  ``previous_losses`` are the validation losses of the earlier epochs (SGD
  phase), ``loss`` the current one. ``nonmono=0`` compares with all of ``L``.
  """
  losses = list(previous_losses)
  return len(losses) > nonmono and loss > min(losses[:len(losses) - nonmono])


def averaging_starts(epoch: int, previous_losses: Sequence[float], loss: float, nonmono: int,
                     start_epoch: int = 0) -> bool:
  """Whether averaging switches on after ``epoch`` (1-based): at the fixed
  ``start_epoch`` (> 0: averaging from that epoch on) or by the
  :func:`nonmonotone_trigger` on the validation ``loss``."""
  fixed = bool(start_epoch) and epoch + 1 >= start_epoch
  return fixed or nonmonotone_trigger(previous_losses, loss, nonmono)


@dataclasses.dataclass(frozen=True)
class EpochEnd:
  """What :meth:`SparseTraining.end_epoch` did."""
  averaging: bool  # averaging was on during the epoch (its validation used the averages)
  switched: bool  # averaging switched on after it
  restarted: bool  # averaging started over after it
  topology_distance: dict  # per matrix, the epoch-end topology update's (empty: none)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """The optimizer the config's optimizer keys describe."""
  return optim.make_optimizer(config.optimizer, config.lr, weight_decay=config.weight_decay,
                              clip_norm=config.clip if config.clip > 0 else None,
                              momentum=config.momentum)


def build_method(config: ml_collections.ConfigDict, steps_per_epoch: int) -> methods.Method:
  """The sparse method the config's sparsity keys describe, scheduled over the whole run."""
  return methods.make_method(
      config.method, density=config.density, sparse_init=config.sparse_init,
      death_rate=config.death_rate, death_rate_final=config.death_rate_final,
      total_steps=config.num_epochs * steps_per_epoch, growth=config.growth,
      growth_ties=config.growth_ties, every_steps=config.update_every,
      end_fraction=config.update_end_fraction)


class SparseTraining:
  """One run's sparse method and optimizer, and the transitions they make.

  Args:
    method: the sparse-training method (masks, topology updates, schedules).
    tx: the optimizer (any of :mod:`selfish_jax.optim`, or any optax optimizer
      made sparse by :func:`selfish_jax.optim.sparsify`).
    topology_key: the key every topology update folds its step or epoch into.
    gate_layout: the model's gate layout, for per-gate densities.
    nonmono, asgd_start_epoch, asgd_restart_epochs: the switch and restarts
      (see :func:`averaging_starts`).
  """

  def __init__(self, method: methods.Method, tx: optax.GradientTransformationExtraArgs, *,
               topology_key: jax.Array, gate_layout: dict,
               nonmono: int = 5, asgd_start_epoch: int = 0,
               asgd_restart_epochs: Sequence[int] = ()):
    self.method, self.tx = method, tx
    self.topology_key, self.gate_layout = topology_key, gate_layout
    self.nonmono, self.asgd_start_epoch = nonmono, asgd_start_epoch
    self.asgd_restart_epochs = tuple(asgd_restart_epochs)
    # One program over all matrices, donating the params so XLA updates them in place.
    self._update = jax.jit(method.update, donate_argnums=0) if method.update else None
    self._union = jax.jit(sparsity.union_masks)
    self._distance = jax.jit(sparsity.topology_distance)
    self.eval_weights = jax.jit(lambda state: optim.averaged_params(
        state.opt_state, state.params, state.masks))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, steps_per_epoch: int,
                  topology_key: jax.Array, gate_layout: dict) -> 'SparseTraining':
    """The core of a run of ``config`` (its optimizer and sparsity keys)."""
    return cls(build_method(config, steps_per_epoch), build_optimizer(config),
               topology_key=topology_key, gate_layout=gate_layout,
               nonmono=config.nonmono, asgd_start_epoch=config.asgd_start_epoch,
               asgd_restart_epochs=config.asgd_restart_epochs)

  def init_state(self, params: PyTree, mask_key: jax.Array, carry: PyTree = ()) -> TrainState:
    """The initial state: masks with exact counts, masked params, fresh optimizer state
    (averaging on from the start if ``asgd_start_epoch == 1``)."""
    # Not jitted as a whole (it runs once): the per-matrix selections are jitted
    # by shape, so one program is compiled per distinct matrix shape.
    masks = self.method.init_masks(mask_key, params)
    params = sparsity.apply_masks(params, masks)
    grows_by_gradient = self.method.grows_by == 'gradient'
    state = TrainState(step=jnp.int32(0), params=params, masks=masks,
                       opt_state=self.tx.init(params), carry=carry,
                       method_state=self.method.initial_state,
                       ever_active=jax.tree.map(jnp.copy, masks),
                       gradients=jax.tree.map(jnp.zeros_like, params) if grows_by_gradient
                       else None)
    if optim.can_average(state.opt_state) and self.asgd_start_epoch == 1:
      state = state.replace(opt_state=optim.start_averaging(state.opt_state))
    return state

  def growth_scores(self, state: TrainState) -> PyTree:
    """What the method grows by: the latest train step's gradient, the optimizer's
    first moment, or None."""
    if self.method.grows_by == 'gradient':
      return state.gradients
    if self.method.grows_by == 'momentum':
      return optim.first_moment(state.opt_state)
    return None

  def change_topology(self, state: TrainState, key: jax.Array) -> TrainState:
    """The method's topology update, growing by what the latest step left."""
    params, masks, method_state = self._update(state.params, state.masks, state.method_state,
                                               key, state.step, self.growth_scores(state))
    return state.replace(params=params, masks=masks, method_state=method_state,
                         ever_active=self._union(state.ever_active, masks))

  def after_step(self, state: TrainState, step: int) -> TrainState:
    """After train step ``step``: the update of methods that change every ΔT steps."""
    if self.method.updates_at(step, epoch_end=False):
      state = self.change_topology(state, jax.random.fold_in(self.topology_key, step))
    return state

  def epoch_end_topology(self, state: TrainState, epoch: int, step: int
                         ) -> tuple[TrainState, dict]:
    """The epoch-end topology update if the method makes one at ``step``, and its
    per-matrix topology distance (empty when there was none)."""
    if not self.method.updates_at(step, epoch_end=True):
      return state, {}
    before = state.masks
    state = self.change_topology(state, jax.random.fold_in(self.topology_key, epoch))
    return state, sparsity.host_numbers(self._distance(before, state.masks))

  def end_epoch(self, state: TrainState, host: HostState, epoch: int, step: int,
                val_loss: float) -> tuple[TrainState, EpochEnd]:
    """After ``epoch`` was validated at ``val_loss``: the switch to averaging (by
    the trigger on ``host.val_losses``, which gets ``val_loss`` while averaging is
    off), the epoch-end topology update (skipped in the epoch that switched, as
    the reference does) and the averaging restarts."""
    averaging = bool(optim.is_averaging(state.opt_state))
    switched = (not averaging and optim.can_average(state.opt_state) and averaging_starts(
        epoch, host.val_losses, val_loss, self.nonmono, self.asgd_start_epoch))
    if switched:
      state = state.replace(opt_state=optim.start_averaging(state.opt_state))
      logging.info('Switching to averaging after epoch %d.', epoch)
    if not averaging:
      host.val_losses.append(val_loss)
    moved = {}
    if not switched:
      state, moved = self.epoch_end_topology(state, epoch, step)
    restarted = averaging and epoch in self.asgd_restart_epochs
    if restarted:
      state = state.replace(opt_state=optim.restart_averaging(state.opt_state))
      logging.info('Averaging starts over after epoch %d.', epoch)
    return state, EpochEnd(averaging, switched, restarted, moved)

  def continue_after_switch(self, state: TrainState, epoch: int) -> tuple[TrainState, dict]:
    """A switch checkpoint's state (end of ``epoch``) continued with this run's
    optimizer, whose SGD phase must carry no state: an optimizer that averages
    switches on at once; one that does not gets the epoch-end topology update
    the switching run skipped (the same key and scores). Returns the state and
    that update's topology distance (empty if none)."""
    state = state.replace(opt_state=self.tx.init(state.params))
    if optim.can_average(state.opt_state):
      return state.replace(opt_state=optim.start_averaging(state.opt_state)), {}
    return self.epoch_end_topology(state, epoch, int(state.step))

  def mask_fields(self, state: TrainState) -> dict:
    """What an epoch record says about the masks (host numbers)."""
    summary = sparsity.summarize(state.masks, self.gate_layout, state.ever_active)
    return {k: summary[k] for k in ('density', 'gate_density', 'itop_rate',
                                    'itop_rate_per_matrix')}

  def rates(self, step: int) -> dict[str, float]:
    """What the method's schedules say at ``step``: the removal fraction it
    really uses (``death_rate``) and, for gradual pruning, the target density."""
    rates = {}
    if self.method.removal_rate is not None:
      rates['death_rate'] = float(self.method.removal_rate(step))
    if self.method.density_schedule is not None:
      rates['target_density'] = float(self.method.density_schedule(step))
    return rates

  def describe(self, state: TrainState) -> str:
    """The start line's account of the method and its active weights."""
    summary = sparsity.summarize(state.masks)
    count = sparsity.host_numbers(sparsity.parameter_count(state.params, state.masks))
    return (f'method {self.method.name}: {count} of '
            f'{sum(p.size for p in jax.tree.leaves(state.params))} weights active (density '
            f'{summary["density"]:.4f} of the masked matrices); active per matrix '
            f'{summary["active"]}')


def restore_at_switch(workdir: str, like: TrainState, tx: optax.GradientTransformation
                      ) -> tuple[TrainState, HostState, PyTree] | None:
  """The state, host state and best weights so far of the run in ``workdir`` at
  the end of the epoch whose validation switched averaging on, or None if it
  has not switched.

  ``like`` gives the state's structure; ``tx`` is the optimizer that run used.
  """
  checkpoints = Checkpoints(workdir)
  try:
    restored = checkpoints.restore_switch(like.replace(opt_state=tx.init(like.params)))
  finally:
    checkpoints.close()
  if restored is None:
    return None
  state, host_json, best = restored
  return state, HostState.from_json(host_json), best
