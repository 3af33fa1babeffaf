"""Re-masking: the last stage of every optimizer, after which inactive weights are zero."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from selfish_jax.sparsity.masks import Masks, map_with_masks

PyTree = Any


def mask_updates(updates: PyTree, params: PyTree, masks: Masks | None) -> PyTree:
  """Updates after which every inactive weight is exactly zero.

  ``params + mask_updates(...)`` is ``where(mask, params + updates, 0)``: the
  weights are re-masked after every step, whatever the mask was before.
  """
  return map_with_masks(
      lambda u, m, p: u if m is None else jnp.where(m, u, -p), updates, masks, params)


def remask() -> optax.GradientTransformationExtraArgs:
  """Stateless: updates after which every inactive weight is exactly zero.

  Ends the optimizers that do not average; ``update`` takes ``params`` and the
  keyword ``masks`` (omit it for a dense model).
  """

  def update_fn(updates, state, params=None, *, masks: Masks | None = None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('remask() needs params')
    return mask_updates(updates, params, masks), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)
