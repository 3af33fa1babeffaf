"""SNT-ASGD's averaging as optax transforms, and the queries on their state.

Every weight keeps its own step counter ``k``, reset to 0 while the weight is
inactive, and its average follows ``ax <- p`` if ``k <= 2`` else
``ax <- ax + (p - ax) / (k - 1)``; averages of inactive weights are zero
(:func:`sparse_averaging`). :func:`dense_averaging` is the ablation: torch's
ASGD with ``t0=0, lambd=0``, one counter for every weight.

The switch is a value in the state, not a new optimizer, so a jitted train
step never recompiles: the training loop decides when (the non-monotone
trigger, :mod:`selfish_jax.training.core`) and calls :func:`start_averaging`;
:func:`averaged_params` gives the weights to evaluate.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from selfish_jax.optim.remask import mask_updates
from selfish_jax.sparsity.masks import Masks, is_masked_node, map_with_masks

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

  def average(state, new_params, masks):
    steps = map_with_masks(
        lambda k, m: k + 1 if m is None else jnp.where(m, k + 1, 0), state.weight_steps, masks)

    def average_leaf(ax, m, k, p):
      mu = 1.0 / jnp.maximum(k - 1, 1).astype(p.dtype)
      ax = jnp.where(k <= 2, p, ax + (p - ax) * mu)
      return ax if m is None else jnp.where(m, ax, jnp.zeros_like(ax))

    averages = map_with_masks(average_leaf, state.averages, masks, steps, new_params)
    return SparseAveragingState(state.averaging, steps, averages)

  return _remask_then_average('sparse_averaging', init_fn, average)


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

  def average(state, new_params, masks):
    del masks  # every weight is averaged
    step = state.step + 1
    mu = 1.0 / jnp.maximum(step - 1, 1).astype(jnp.float32)
    averages = jax.tree.map(
        lambda ax, p: jnp.where(step <= 2, p, ax + (p - ax) * mu.astype(p.dtype)),
        state.averages, new_params)
    return DenseAveragingState(state.averaging, step, averages)

  return _remask_then_average('dense_averaging', init_fn, average)


def _remask_then_average(name: str, init_fn, average) -> optax.GradientTransformationExtraArgs:
  """The transform both averagings are: re-mask the updates, then, once
  ``state.averaging`` is on, ``average(state, params + updates, masks)``."""

  def update_fn(updates, state, params=None, *, masks: Masks | None = None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f'{name} needs params')
    updates = mask_updates(updates, params, masks)
    # Computed outside the cond: the caller's apply_updates is the same sum,
    # which XLA then computes once, in place, instead of passing the old
    # params (a copy, as they are donated) and the updates into the cond.
    new_params = optax.apply_updates(params, updates)
    # Before the trigger the averages are not needed: skip their cost.
    state = jax.lax.cond(
        state.averaging, lambda s: average(s, new_params, masks), lambda s: s, state)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
  # A leaf another group of optax.partition owns (MaskedNode) is not averaged.
  return jax.tree.map(lambda a, p: p if is_masked_node(a) else jnp.where(state.averaging, a, p),
                      averages, params, is_leaf=is_masked_node)
