"""The sparse-training core: what every task's training shares.

A :class:`SparseTraining` holds one run's method and optimizer and applies the
transitions of Selfish-RNN training to a :class:`~selfish_jax.training.state.TrainState`:
the initial masked state, the sparse train step (a task supplies only its
gradient), the step-level topology updates (RigL, GMP), the epoch end
(SNT-ASGD's switch by the non-monotone trigger, the epoch-end topology update,
averaging restarts), the weights to evaluate and what an epoch record says
about the masks. It is built from values (the run setup,
:mod:`selfish_jax.training.setup`, reads the config); the epoch loop that calls
it is :mod:`selfish_jax.training.loop`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import optax

from selfish_jax import optim, sparsity
from selfish_jax.sparsity import methods
from selfish_jax.training.state import TrainState

PyTree = Any
# A task's gradient: ``grad_fn(params, carry, batch, key) -> (loss, new carry, grads)``.
GradFn = Callable[[PyTree, PyTree, Any, jax.Array], tuple[jax.Array, PyTree, PyTree]]
TrainStep = Callable[..., tuple[TrainState, jax.Array]]


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
  val_losses: tuple  # the trigger's history after this epoch (SGD-phase validation losses)


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
               topology_key: jax.Array, gate_layout: sparsity.masks.GateLayout,
               nonmono: int = 5, asgd_start_epoch: int = 0,
               asgd_restart_epochs: Sequence[int] = ()):
    self.method, self.tx = method, tx
    self.topology_key, self.gate_layout = topology_key, gate_layout
    self.nonmono, self.asgd_start_epoch = nonmono, asgd_start_epoch
    self.asgd_restart_epochs = tuple(asgd_restart_epochs)
    # One program over all matrices, donating the params so XLA updates them in place.
    self._update = jax.jit(method.update, donate_argnums=0) if method.update else None
    self._union = jax.jit(sparsity.union_masks)
    self._distance_counts = jax.jit(sparsity.distance.topology_distance_counts)
    self.eval_weights = jax.jit(lambda state: optim.averaged_params(
        state.opt_state, state.params, state.masks))

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

  def train_step(self, grad_fn: GradFn) -> TrainStep:
    """The sparse train step of a task's gradient (pure; the task jits it):
    ``step(state, batch, dropout_key, lr_factor=1.0) -> (state, loss)``.

    The dropout key of step ``s`` is ``fold_in(dropout_key, s)``, so a resumed
    run draws the same dropout masks as an uninterrupted one (the key is an
    argument, not a constant of the program, so runs that differ only in
    their seed share compilations). ``lr_factor`` reaches the optimizer as an
    extra argument (variable-length BPTT scales each step's learning rate by
    its window's length).

    When ``state.gradients`` is not None the step keeps its gradient there
    (what the task's loss gives, on the carried state and with this step's
    dropout): the scores of a gradient-growth update that follows, with no
    second gradient pass. It is kept before clipping: the clip multiplies
    every gradient by one positive scalar and rounding is monotone, so the
    order of magnitudes inside a matrix, which is all a growth ranks, stays
    (at most two nearly equal values become a tie).
    """
    tx = self.tx

    def step(state: TrainState, batch: Any, dropout_key: jax.Array,
             lr_factor: jax.Array | float = 1.0) -> tuple[TrainState, jax.Array]:
      key = jax.random.fold_in(dropout_key, state.step)
      loss, carry, grads = grad_fn(state.params, state.carry, batch, key)
      updates, opt_state = tx.update(grads, state.opt_state, state.params, masks=state.masks,
                                     lr_factor=lr_factor)
      return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state, carry=jax.lax.stop_gradient(carry),
                           gradients=None if state.gradients is None else grads), loss

    return step

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
    counts = jax.device_get(self._distance_counts(before, state.masks))
    return state, {name: int(differ) / int(total) if total else 0.0
                   for name, (differ, total) in counts.items()}

  def end_epoch(self, state: TrainState, val_losses: Sequence[float], epoch: int, step: int,
                val_loss: float) -> tuple[TrainState, EpochEnd]:
    """After ``epoch`` was validated at ``val_loss``: the switch to averaging (by
    the trigger on the SGD phase's ``val_losses``, which ``val_loss`` joins while
    averaging is off), the epoch-end topology update (skipped in the epoch that
    switched, as the reference does) and the averaging restarts."""
    averaging = bool(optim.is_averaging(state.opt_state))
    switched = (not averaging and optim.can_average(state.opt_state) and averaging_starts(
        epoch, val_losses, val_loss, self.nonmono, self.asgd_start_epoch))
    if switched:
      state = state.replace(opt_state=optim.start_averaging(state.opt_state))
      logging.info('Switching to averaging after epoch %d.', epoch)
    history = tuple(val_losses) + (() if averaging else (val_loss,))
    moved = {}
    if not switched:
      state, moved = self.epoch_end_topology(state, epoch, step)
    restarted = averaging and epoch in self.asgd_restart_epochs
    if restarted:
      state = state.replace(opt_state=optim.restart_averaging(state.opt_state))
      logging.info('Averaging starts over after epoch %d.', epoch)
    return state, EpochEnd(averaging, switched, restarted, moved, history)

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

  @staticmethod
  def size_fields(state: TrainState) -> dict:
    """The final record's account of the model's size: ``density`` (of the masked
    matrices) and ``params`` (the weights that exist, dense leaves included)."""
    return {'density': sparsity.summarize(state.masks)['density'],
            'params': sparsity.host_numbers(sparsity.parameter_count(state.params, state.masks))}

  def describe(self, state: TrainState) -> str:
    """The start line's account of the method and its active weights."""
    summary = sparsity.summarize(state.masks)
    count = sparsity.host_numbers(sparsity.parameter_count(state.params, state.masks))
    return (f'method {self.method.name}: {count} of '
            f'{sum(p.size for p in jax.tree.leaves(state.params))} weights active (density '
            f'{summary["density"]:.4f} of the masked matrices); active per matrix '
            f'{summary["active"]}')
