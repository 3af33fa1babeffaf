"""Optimizer state of inactive weights: zeroed after every step, as the reference does.

The official ``Masking.apply_mask`` multiplies SGD's momentum buffer by the
mask after every step, so the momentum of an inactive weight is zero and a
weight that regrows starts with zero momentum, like a new parameter. The same
rule applies here to every parameter-shaped buffer of the wrapped transform:
momentum's trace, and Adam's first and second moments (the reference leaves
Adam's moments alone; zeroing them treats a regrown weight the same way under
both optimizers).

What this means for growth by momentum (SNFS, ``growth='momentum'``): at an
update, the momentum of every weight inactive since the last step is zero;
only the weights that the update itself just removed still carry momentum,
so momentum growth regrows those first, then breaks the tie among the zeros
by position. That is what the official code's ``momentum_growth`` reads too.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from selfish_jax.sparsity.masks import Masks, map_with_masks


def zero_inactive_state(inner: optax.GradientTransformation
                        ) -> optax.GradientTransformationExtraArgs:
  """``inner`` whose parameter-shaped state is zero wherever the mask is off,
  after every update.

  ``update`` takes the keyword ``masks`` (omit it, or pass ``None`` leaves, for
  dense weights, whose state is left as it is) and passes every keyword on to
  ``inner``. Only the leaves of ``inner``'s state that mirror the parameters
  (found with :func:`optax.tree_utils.tree_map_params`) are touched: counters
  and other scalars stay.
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, *, masks: Masks | None = None, **extra_args):
    updates, state = inner.update(updates, state, params, masks=masks, **extra_args)
    if masks is None:
      return updates, state
    keep = map_with_masks(lambda u, m: jnp.ones((), bool) if m is None else m, updates, masks)
    state = optax.tree_utils.tree_map_params(
        inner, lambda s, k: jnp.where(k, s, jnp.zeros_like(s)), state, keep)
    return updates, state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
