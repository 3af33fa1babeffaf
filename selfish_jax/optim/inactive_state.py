"""Optimizer state of inactive weights: zeroed after every step, as the reference does.

The official ``Masking.apply_mask`` multiplies SGD's momentum buffer by the
mask after every step, so the momentum of an inactive weight is zero and a
weight that regrows starts with zero momentum, like a new parameter. The same
rule applies here to every parameter-shaped buffer of the optimizer
:func:`~selfish_jax.optim.sparsify` wraps: momentum's trace, and Adam's first
and second moments (the reference leaves Adam's moments alone; zeroing them
treats a regrown weight the same way under both optimizers).

What this means for growth by momentum (SNFS, ``growth='momentum'``): at an
update, the momentum of every weight inactive since the last step is zero;
only the weights that the update itself just removed still carry momentum,
so momentum growth regrows those first, then breaks the tie among the zeros
(in a random order, :data:`selfish_jax.sparsity.GROWTH_TIES`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from selfish_jax.sparsity.masks import Masks, map_with_masks

PyTree = Any


def zero_inactive(inner: optax.GradientTransformation, state: optax.OptState, masks: Masks,
                  like: PyTree) -> optax.OptState:
  """``inner``'s state with every parameter-shaped buffer zero where the mask is off.

  Only the leaves of the state that mirror the parameters (found with
  :func:`optax.tree_utils.tree_map_params`) are touched: counters and other
  scalars stay. ``like`` has the parameters' structure (``optax.MaskedNode``
  where a partition's other group owns the leaf).
  """
  keep = map_with_masks(lambda u, m: jnp.ones((), bool) if m is None else m, like, masks)
  return optax.tree_utils.tree_map_params(
      inner, lambda s, k: jnp.where(k, s, jnp.zeros_like(s)), state, keep)
