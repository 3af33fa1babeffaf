"""SNT-ASGD: sparse non-monotonically triggered averaged SGD, as optax transforms.

Training starts as SGD (global-norm clipping over all gradients, inactive
positions included, then weight decay). When validation stops improving
(:func:`nonmonotone_trigger`), :func:`start_averaging` switches the same
optimizer to averaged SGD at the same learning rate: every weight keeps its own
step counter ``k``, reset to 0 while the weight is inactive, and its average
follows ``ax <- p`` if ``k <= 2`` else ``ax <- ax + (p - ax) / (k - 1)``;
averages of inactive weights are zero. Dense leaves (no mask) are averaged the
same way, which is torch's ASGD with ``t0=0, lambd=0``.

The switch is a value in the state, not a new optimizer, so the jitted train
step never recompiles; :func:`averaged_params` gives the weights to evaluate.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from selfish_jax.sparsity.masks import Masks, map_with_masks

PyTree = Any


class SparseAveragingState(NamedTuple):
  """State of :func:`sparse_averaging`.

  Attributes:
    averaging: scalar bool, whether averaging has been switched on.
    weight_steps: per-weight step counters ``k`` (int32, like the params).
    averages: per-weight averages ``ax`` (like the params).
  """
  averaging: jax.Array
  weight_steps: PyTree
  averages: PyTree


class DenseAveragingState(NamedTuple):
  """State of :func:`dense_averaging`.

  Attributes:
    averaging: scalar bool, whether averaging has been switched on.
    step: one step counter ``k`` for every weight (int32 scalar).
    averages: per-weight averages ``ax`` (like the params).
  """
  averaging: jax.Array
  step: jax.Array
  averages: PyTree


def mask_updates(updates: PyTree, params: PyTree, masks: Masks | None) -> PyTree:
  """Updates after which every inactive weight is exactly zero.

  ``params + mask_updates(...)`` is ``where(mask, params + updates, 0)``: the
  weights are re-masked after every step, whatever the mask was before.
  """
  return map_with_masks(
      lambda u, m, p: u if m is None else jnp.where(m, u, -p), updates, masks, params)


def masked() -> optax.GradientTransformationExtraArgs:
  """Stateless: updates after which every inactive weight is exactly zero.

  Ends the optimizers that do not average; ``update`` takes ``params`` and the
  keyword ``masks`` (omit it for a dense model).
  """

  def update_fn(updates, state, params=None, *, masks: Masks | None = None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('masked() needs params')
    return mask_updates(updates, params, masks), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def sparse_averaging() -> optax.GradientTransformationExtraArgs:
  """Masks the final updates and keeps the SNT-ASGD per-weight averages.

  Must come last in a chain (after the learning-rate scaling): it averages
  ``params + updates``. ``update`` takes ``params`` and the keyword ``masks``
  (the same pytree as the params with ``None`` for dense leaves; omit it for a
  dense model).
  """

  def init_fn(params):
    return SparseAveragingState(
        averaging=jnp.asarray(False),
        weight_steps=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.int32), params),
        averages=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, *, masks: Masks | None = None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('sparse_averaging needs params')
    updates = mask_updates(updates, params, masks)

    def average(state):
      new_params = optax.apply_updates(params, updates)

      steps = map_with_masks(
          lambda k, m: k + 1 if m is None else jnp.where(m, k + 1, 0), state.weight_steps, masks)

      def average_leaf(ax, m, k, p):
        mu = 1.0 / jnp.maximum(k - 1, 1).astype(p.dtype)
        ax = jnp.where(k <= 2, p, ax + (p - ax) * mu)
        return ax if m is None else jnp.where(m, ax, jnp.zeros_like(ax))

      averages = map_with_masks(average_leaf, state.averages, masks, steps, new_params)
      return SparseAveragingState(state.averaging, steps, averages)

    # Before the trigger the averages are not needed: skip their cost.
    state = jax.lax.cond(state.averaging, average, lambda s: s, state)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dense_averaging() -> optax.GradientTransformationExtraArgs:
  """Masks the final updates and keeps torch-ASGD averages of every weight.

  The ablation of :func:`sparse_averaging`: one global counter ``k`` and the
  same rule ``ax <- p`` if ``k <= 2`` else ``ax <- ax + (p - ax) / (k - 1)``,
  but an inactive weight's average keeps averaging (its zeros included) and
  a regrown weight's average starts from its old history. Must come last in
  a chain, like :func:`sparse_averaging`.
  """

  def init_fn(params):
    return DenseAveragingState(averaging=jnp.asarray(False), step=jnp.zeros([], jnp.int32),
                               averages=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, *, masks: Masks | None = None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('dense_averaging needs params')
    updates = mask_updates(updates, params, masks)

    def average(state):
      step = state.step + 1
      mu = 1.0 / jnp.maximum(step - 1, 1).astype(jnp.float32)
      averages = jax.tree.map(
          lambda ax, p: jnp.where(step <= 2, p, ax + (p - ax) * mu.astype(p.dtype)),
          state.averages, optax.apply_updates(params, updates))
      return DenseAveragingState(state.averaging, step, averages)

    state = jax.lax.cond(state.averaging, average, lambda s: s, state)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_and_decay(clip_norm: float | None, weight_decay: float) -> list:
  """Global-norm clipping over ALL gradients (inactive positions included, as
  the reference computes it; ``None`` disables it), then L2 weight decay added
  to the clipped gradient, as torch's SGD."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm is not None else []
  return parts + [optax.add_decayed_weights(weight_decay)]


def scale_by_lr_factor() -> optax.GradientTransformationExtraArgs:
  """Stateless: multiplies the updates by the ``lr_factor`` keyword of ``update``
  (1 when it is not given). Placed just before the learning-rate scaling, it
  scales the step size of that one step, as AWD-LSTM's variable BPTT does."""

  def update_fn(updates, state, params=None, *, lr_factor=1.0, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: u * jnp.asarray(lr_factor, u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def snt_asgd(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1.2e-6,
             clip_norm: float | None = 0.25) -> optax.GradientTransformationExtraArgs:
  """The Selfish-RNN optimizer: clip, weight decay, SGD step, mask, average.

  Args:
    learning_rate: step size (a scalar or an optax schedule).
    weight_decay: L2 coefficient added to the (clipped) gradient.
    clip_norm: global-norm clipping threshold; ``None`` disables it.

  Returns:
    A transform whose ``update(grads, state, params, masks=masks)`` returns
    masked updates; it averages once :func:`start_averaging` switched it on.
    ``update(..., lr_factor=f)`` scales that step's learning rate by ``f``.
    Wrap it in ``optax.inject_hyperparams`` to schedule its hyperparameters,
    or chain it after other transforms.
  """
  return optax.chain(*clip_and_decay(clip_norm, weight_decay), scale_by_lr_factor(),
                     optax.scale_by_learning_rate(learning_rate), sparse_averaging())


def asgd(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1.2e-6,
         clip_norm: float | None = 0.25) -> optax.GradientTransformationExtraArgs:
  """:func:`snt_asgd` with :func:`dense_averaging`: NT-ASGD as AWD-LSTM runs it, for the ablation."""
  return optax.chain(*clip_and_decay(clip_norm, weight_decay), scale_by_lr_factor(),
                     optax.scale_by_learning_rate(learning_rate), dense_averaging())


def sgd(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1.2e-6,
        clip_norm: float | None = 0.25) -> optax.GradientTransformationExtraArgs:
  """:func:`snt_asgd` without averaging (no averaging state): the SGD phase only."""
  return optax.chain(*clip_and_decay(clip_norm, weight_decay), scale_by_lr_factor(),
                     optax.scale_by_learning_rate(learning_rate), masked())


def _averaging_state(opt_state: optax.OptState
                     ) -> SparseAveragingState | DenseAveragingState | None:
  for state_type in (SparseAveragingState, DenseAveragingState):
    state = optax.tree_utils.tree_get(opt_state, state_type.__name__)
    if state is not None:
      return state
  return None


def can_average(opt_state: optax.OptState) -> bool:
  """Whether the state holds averaging (:func:`sparse_averaging` or :func:`dense_averaging`)."""
  return _averaging_state(opt_state) is not None


def is_averaging(opt_state: optax.OptState) -> jax.Array:
  """Whether averaging is on (always False for a state without averaging)."""
  state = _averaging_state(opt_state)
  return jnp.asarray(False) if state is None else state.averaging


def start_averaging(opt_state: optax.OptState) -> optax.OptState:
  """Switches averaging on (the NT-ASGD trigger fired); counters start at 0."""
  if _averaging_state(opt_state) is None:
    raise ValueError('this optimizer state has no averaging to switch on')
  return optax.tree_utils.tree_set(opt_state, averaging=jnp.asarray(True))


def restart_averaging(opt_state: optax.OptState) -> optax.OptState:
  """Averaging starts over, still on: every counter at 0 and every average at
  0, so the next step's weights are the new averages' first term (the
  official ON-LSTM script's fine-tuning restarts: a new ``Sparse_ASGD``)."""
  state = _averaging_state(opt_state)
  if state is None:
    raise ValueError('this optimizer state has no averaging to restart')
  fresh = jax.tree.map(jnp.zeros_like, state)._replace(averaging=jnp.asarray(True))
  is_averaging_state = lambda node: isinstance(node, type(state))
  return jax.tree.map(lambda node: fresh if is_averaging_state(node) else node, opt_state,
                      is_leaf=is_averaging_state)


def averaged_params(opt_state: optax.OptState, params: PyTree,
                    masks: Masks | None = None) -> PyTree:
  """The averaged weights once averaging is on, else ``params`` themselves.

  With ``masks``, averages are zeroed where the mask is False, so the weights
  evaluated always have the run's parameter count (a no-op for SNT-ASGD,
  whose averages of inactive weights are zero already; dense averaging keeps
  averages there).
  """
  state = _averaging_state(opt_state)
  if state is None:
    return params
  averages = state.averages
  if masks is not None:
    averages = map_with_masks(lambda a, m: a if m is None else jnp.where(m, a, 0), averages, masks)
  return jax.tree.map(lambda a, p: jnp.where(state.averaging, a, p), averages, params)


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
