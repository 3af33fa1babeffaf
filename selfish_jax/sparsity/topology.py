"""Topology updates: prune and regrow a fixed number of weights per matrix.

Pure, jittable functions over ``(params, masks, scores, key, death_rate)``.
Every masked leaf is updated as one matrix, so the four gates of a fused LSTM
kernel compete for one budget. Counts are exact: each leaf loses
``ceil(death_rate * active)`` weights and regains the same number.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from selfish_jax.errors import ConfigError
from selfish_jax.sparsity import select
from selfish_jax.sparsity.masks import Masks, flatten_with_masks

PyTree = Any

GROWTH_MODES = ('random', 'gradient', 'momentum')
REMOVAL_MODES = ('magnitude', 'set')
# How growth by score (gradient, momentum) orders equal scores: a random order
# from the update's key, or the lowest positions first (what runs before
# 2026-12-06 did; it fills an embedding's first rows, the most frequent words).
GROWTH_TIES = ('random', 'lowest_position')


def death_rate_schedule(initial: float, decay_steps: int, final: float = 0.005) -> optax.Schedule:
  """Cosine decay of the removal fraction per step, clamped at ``final`` (an optax schedule).

  ``final + (initial - final) * (1 + cos(pi * min(step, decay_steps) / decay_steps)) / 2``.
  The reference steps a cosine-annealing schedule once per training step from
  ``initial`` to 0.005 over the whole run.
  """
  if decay_steps < 1:
    raise ConfigError(f'decay_steps must be >= 1, got {decay_steps}')
  if initial <= 0:
    return optax.constant_schedule(0.0)
  return optax.cosine_decay_schedule(initial, decay_steps, alpha=final / initial)


def num_to_remove(active: jax.Array, death_rate: jax.Array) -> jax.Array:
  """``ceil(death_rate * active)`` (float32), never more than ``active``."""
  n = jnp.ceil(jnp.asarray(death_rate, jnp.float32) * active.astype(jnp.float32))
  return jnp.minimum(n.astype(jnp.int32), active)


def removal_mask(weights: jax.Array, mask: jax.Array, count: jax.Array,
                 mode: str = 'magnitude', active: jax.Array | None = None) -> jax.Array:
  """Positions to remove: ``count`` active weights chosen by ``mode``.

  ``magnitude``: the smallest ``|w|``. ``set`` (SET): half (rounded up) among
  the smallest positive weights, the rest among the negative weights closest
  to zero (falling back to magnitude where one sign runs short).
  """
  if mode == 'magnitude':
    return select.smallest_magnitudes(weights, mask, count, active)
  if mode == 'set':
    keys = select.magnitude_keys(weights)
    positive = mask & (weights > 0)
    half = (count + 1) // 2
    from_positive = select.select_smallest(keys, positive, half)
    negative = mask & (weights < 0)
    rest = count - select.count_true(from_positive)
    from_negative = select.select_smallest(keys, negative, rest)
    chosen = from_positive | from_negative
    shortfall = count - select.count_true(chosen)
    return chosen | select.select_smallest(keys, mask & ~chosen, shortfall)
  raise ConfigError(f'unknown removal mode {mode!r}; expected one of {REMOVAL_MODES}')


def keep_weights(weights: jax.Array, old_mask: jax.Array, new_mask: jax.Array) -> jax.Array:
  """The weights after a topology update: a weight active before and after keeps its value.

  That includes a weight removed and regrown at the same position in one
  update: the reference only changes masks and multiplies the untouched
  weights by the final mask. Positions inactive before the update (newly
  grown) start at 0.
  """
  return jnp.where(old_mask & new_mask, weights, jnp.zeros_like(weights))


def check_growth_ties(ties: str) -> None:
  """Raises ConfigError unless ``ties`` is one of :data:`GROWTH_TIES`."""
  if ties not in GROWTH_TIES:
    raise ConfigError(f'unknown growth_ties {ties!r}; expected one of {GROWTH_TIES}')


def grow_by_score(scores: jax.Array, survivors: jax.Array, count: jax.Array, free: jax.Array,
                  key: jax.Array, ties: str = 'random') -> jax.Array:
  """The ``count`` positions the ``survivors`` leave free (``free`` of them)
  with the largest ``|scores|``, equal scores in the order ``ties`` names
  (:data:`GROWTH_TIES`; ``'random'`` draws it from ``key``)."""
  check_growth_ties(ties)
  return select.largest_magnitudes(scores, survivors, count, free, complement=True,
                                   tie_key=key if ties == 'random' else None)


@functools.partial(jax.jit, static_argnames=('removal', 'ties'))
def update_leaf(weights: jax.Array, mask: jax.Array, key: jax.Array, death_rate: jax.Array,
                scores: jax.Array | None = None, removal: str = 'magnitude',
                ties: str = 'random') -> tuple[jax.Array, jax.Array]:
  """Prunes and regrows one matrix; returns ``(weights, mask)``.

  Regrowth chooses among all positions inactive after removal (the just-removed
  ones included, as in the reference and RigL); see :func:`keep_weights` for
  the values. Growth by ``scores`` orders equal scores as ``ties`` says
  (see :func:`grow_by_score`). Selections stay thresholds
  (:class:`~selfish_jax.sparsity.select.Cut`) that the new mask and weights are
  computed from elementwise.
  """
  active = select.count_true(mask)
  count = num_to_remove(active, death_rate)
  survivors = mask & ~removal_mask(weights, mask, count, removal, active)
  free = mask.size - active + count
  # Regrowth ranks the positions the survivors leave free (``complement``: the
  # survivors are inverted inside each counting pass, never written out).
  if scores is None:
    grown = select.random_subset(key, survivors, count, free, complement=True)
  else:
    grown = grow_by_score(scores, survivors, count, free, key, ties)
  new_mask = survivors | grown
  return keep_weights(weights, mask, new_mask), new_mask


def update_topology(params: PyTree, masks: Masks, key: jax.Array, death_rate: jax.Array, *,
                    growth: str = 'random', scores: PyTree | None = None,
                    removal: str = 'magnitude', ties: str = 'random') -> tuple[PyTree, Masks]:
  """One topology update of every masked leaf.

  Args:
    params: the (masked) parameters.
    masks: their masks (``None`` leaves are left alone).
    key: PRNG key for random growth.
    death_rate: fraction of each leaf's active weights to remove.
    growth: ``'random'``, or ``'gradient'``/``'momentum'`` to regrow where
      ``|scores|`` is largest (dense gradients for RigL, momentum for SNFS).
    scores: pytree like ``params``; required unless ``growth == 'random'``.
    removal: ``'magnitude'`` or ``'set'``.
    ties: how growth by scores orders equal scores (:data:`GROWTH_TIES`): a
      gradient that is zero in most rows (an embedding's, after one batch)
      leaves most of the regrowth to this order.

  Returns:
    ``(params, masks)`` with every leaf's active count unchanged.
  """
  if growth not in GROWTH_MODES:
    raise ConfigError(f'unknown growth mode {growth!r}; expected one of {GROWTH_MODES}')
  if growth != 'random' and scores is None:
    raise ValueError(f'growth={growth!r} needs scores (gradients or momentum)')
  flat_masks, treedef, (flat_params, flat_scores) = flatten_with_masks(
      masks, params, scores if growth != 'random' else None)
  keys = jax.random.split(key, len(flat_masks))
  new_params, new_masks = [], []
  for leaf_key, p, m, s in zip(keys, flat_params, flat_masks, flat_scores):
    if m is None:
      new_params.append(p)
      new_masks.append(None)
      continue
    p, m = update_leaf(p, m, leaf_key, death_rate, s, removal, ties)
    new_params.append(p)
    new_masks.append(m)
  return (jax.tree_util.tree_unflatten(treedef, new_params),
          jax.tree_util.tree_unflatten(treedef, new_masks))
