"""Any optax optimizer, sparse: :func:`sparsify`, the one way the optimizers here
are made.

``sparsify(tx)`` runs ``tx``, zeroes its parameter-shaped state (momentum,
Adam's moments) wherever the mask is off, and ends in the stage after which
every inactive weight is exactly zero: re-masking, or SNT-ASGD's sparse
averaging (``average=True``), which re-masks too. Because that stage is inside
the returned transform, nothing can come between it and ``tx``; a stage
chained *after* the returned transform (a momentum of the updates, say) would
move weights the masks turned off, and the next update under the same masks
says so (an error naming the cause) instead of training a model whose
inactive weights drift. A mask change may leave the weights it turns off for
the next update to zero, as the reference's re-masking does.

Masks reach it as the ``masks`` keyword of ``update`` (optax forwards keyword
arguments through ``chain``, ``partition``, ``multi_transform``,
``inject_hyperparams``). A wrapper that drops keyword arguments
(``optax.lookahead``, ``optax.MultiSteps``) cannot forward them: keep the
masks in the state instead with :func:`set_masks` (and again after every
topology update); ``update`` without the keyword then reads them from there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfish_jax.optim.averaging import dense_averaging, sparse_averaging
from selfish_jax.optim.inactive_state import zero_inactive
from selfish_jax.optim.remask import remask
from selfish_jax.sparsity.masks import Masks, check_masks, map_with_masks

PyTree = Any

AVERAGES = (False, True, 'sparse', 'dense')


class SparseState(NamedTuple):
  """State of :func:`sparsify`.

  Attributes:
    inner: the wrapped optimizer's state (moments zero at inactive weights).
    last: the last stage's: ``optax.EmptyState`` for re-masking, or the
      averaging state (:class:`~selfish_jax.optim.SparseAveragingState`).
    masks: masks kept in the state by :func:`set_masks` (None: passed to
      ``update`` as a keyword).
    mask_fingerprint: a uint32 hash of the masks of the last update (what
      tells a mask change from a stage after this one, see :func:`sparsify`).
  """
  inner: optax.OptState
  last: optax.OptState
  masks: Masks | None
  mask_fingerprint: jax.Array


def _last_stage(average: bool | str) -> optax.GradientTransformationExtraArgs:
  if average not in AVERAGES:
    raise ValueError(f'average must be one of {AVERAGES}, got {average!r}')
  if average is False:
    return remask()
  return dense_averaging() if average == 'dense' else sparse_averaging()


def _raise_if_inactive_weights_moved(moved: np.ndarray) -> None:
  if bool(np.any(moved)):
    raise ValueError(
        'sparsify(...) was given a weight that is not zero although its mask was off at the '
        'last update too: a stage chained after sparsify(tx) changed its updates; it must be the '
        'last stage (put the others inside: sparsify(optax.chain(..., tx)))')


def _fingerprint(masks: Masks) -> jax.Array:
  """A uint32 hash of which positions are active (sums wrap around): equal for
  equal masks, different for any topology update but by a 2**-32 chance."""
  total = jnp.uint32(0)
  for index, mask in enumerate(jax.tree.leaves(masks)):
    positions = jax.lax.iota(jnp.uint32, mask.size).reshape(mask.shape)
    mixed = (positions + jnp.uint32(index * 0x632BE5AB % 2**32)) * jnp.uint32(0x9E3779B1)
    total = total + jnp.sum(jnp.where(mask, mixed, jnp.uint32(0)), dtype=jnp.uint32)
  return total


_NO_FINGERPRINT = 0x5BD1E995  # before the first update (equal to a mask's by a 2**-32 chance)


def sparsify(inner: optax.GradientTransformation, *, average: bool | str = False
             ) -> optax.GradientTransformationExtraArgs:
  """``inner`` (any optax optimizer) made sparse; see the module docstring.

  Args:
    inner: the optimizer, e.g. ``optax.adamw(1e-3)`` or a chain.
    average: ``False``: end in re-masking; ``True`` (or ``'sparse'``): end in
      SNT-ASGD's sparse averaging, switched on by
      :func:`~selfish_jax.optim.start_averaging`; ``'dense'``: the dense
      averaging ablation (one counter for every weight).

  Returns:
    A transform whose ``update(updates, state, params, masks=masks, **extra)``
    passes ``extra`` (e.g. ``lr_factor``) to ``inner`` and returns updates
    after which every inactive weight is zero. Its state is a
    :class:`SparseState` (NamedTuples throughout: ``flax.serialization``
    and orbax both write it).
  """
  inner = optax.with_extra_args_support(inner)
  last = _last_stage(average)

  def init_fn(params):
    return SparseState(inner.init(params), last.init(params), None,
                       jnp.uint32(_NO_FINGERPRINT))

  def update_fn(updates, state, params=None, *, masks: Masks | None = None, **extra_args):
    if params is None:
      raise ValueError('sparsify(...) needs params: update(updates, state, params, masks=...)')
    masks = state.masks if masks is None else masks
    if masks is None:
      raise ValueError(
          'sparsify(...) got no masks: pass update(..., masks=masks), or keep them in the state '
          'with selfish_jax.optim.set_masks(opt_state, masks) where a wrapper (optax.lookahead, '
          'optax.MultiSteps) drops keyword arguments')
    check_masks(masks)
    # Every update leaves the inactive weights at zero. Under the masks of the
    # last update an inactive weight that is not means a stage after this one
    # changed the updates (a mask change may leave removed weights for this
    # update to zero). Two reductions; the host is only called to raise.
    fingerprint = _fingerprint(masks)
    moved = (fingerprint == state.mask_fingerprint) & _inactive_nonzero(params, masks)
    jax.lax.cond(moved, lambda: jax.debug.callback(_raise_if_inactive_weights_moved, moved),
                 lambda: None)
    updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    inner_state = zero_inactive(inner, inner_state, masks, updates)
    updates, last_state = last.update(updates, state.last, params, masks=masks)
    return updates, SparseState(inner_state, last_state, state.masks, fingerprint)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _inactive_nonzero(params: PyTree, masks: Masks) -> jax.Array:
  flags = map_with_masks(lambda p, m: jnp.zeros((), bool) if m is None else jnp.any(
      (p != 0) & ~m), params, masks)
  leaves = jax.tree.leaves(flags)
  return jnp.any(jnp.stack(leaves)) if leaves else jnp.zeros((), bool)


def set_masks(opt_state: optax.OptState, masks: Masks) -> optax.OptState:
  """``opt_state`` with ``masks`` kept in every :class:`SparseState` in it, for
  ``update`` calls without the ``masks`` keyword (a wrapper that drops keyword
  arguments). Call it again after every topology update. The state's
  structure changes on the first call: call it before ``jit``/``scan``."""
  check_masks(masks)
  is_sparse_state = lambda node: isinstance(node, SparseState)
  found = [node for node in jax.tree.leaves(opt_state, is_leaf=is_sparse_state)
           if is_sparse_state(node)]
  if not found:
    raise ValueError('this optimizer state holds no sparsify(...) state to keep masks in')
  return jax.tree.map(lambda node: node._replace(masks=masks) if is_sparse_state(node) else node,
                      opt_state, is_leaf=is_sparse_state)
