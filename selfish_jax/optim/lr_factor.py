"""Per-step learning-rate factors (AWD-LSTM's variable BPTT) as an optax transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def scale_by_lr_factor() -> optax.GradientTransformationExtraArgs:
  """Stateless: multiplies the updates by the ``lr_factor`` keyword of ``update``
  (1 when it is not given). Placed just before the learning-rate scaling, it
  scales the step size of that one step, as AWD-LSTM's variable BPTT does."""

  def update_fn(updates, state, params=None, *, lr_factor=1.0, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: u * jnp.asarray(lr_factor, u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)
