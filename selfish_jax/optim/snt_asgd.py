"""SNT-ASGD, its dense-averaging ablation, and its SGD phase alone, as optax transforms.

Training starts as SGD (global-norm clipping over all gradients, inactive
positions included, then weight decay). When validation stops improving, the
training loop switches the same optimizer to averaged SGD at the same
learning rate (:func:`~selfish_jax.optim.averaging.start_averaging`): the
switch is a value in the state, so the jitted step never recompiles.
"""

from __future__ import annotations

import optax

from selfish_jax.optim.chain import sgd_steps
from selfish_jax.optim.sparsify import sparsify


def snt_asgd(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1.2e-6,
             clip_norm: float | None = 0.25) -> optax.GradientTransformationExtraArgs:
  """The Selfish-RNN optimizer: clip, weight decay, SGD step, mask, average.

  Args:
    learning_rate: step size (a scalar or an optax schedule).
    weight_decay: L2 coefficient added to the (clipped) gradient.
    clip_norm: global-norm clipping threshold; ``None`` disables it.

  Returns:
    ``sparsify(sgd, average=True)``: ``update(grads, state, params, masks=masks)``
    returns masked updates; it averages once ``start_averaging`` switched it on.
    ``update(..., lr_factor=f)`` scales that step's learning rate by ``f``.
    Wrap it in ``optax.inject_hyperparams`` to schedule its hyperparameters,
    or chain other transforms before it.
  """
  return sparsify(sgd_steps(learning_rate, weight_decay=weight_decay, clip_norm=clip_norm),
                  average=True)


def asgd(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1.2e-6,
         clip_norm: float | None = 0.25) -> optax.GradientTransformationExtraArgs:
  """:func:`snt_asgd` with dense averaging: NT-ASGD as AWD-LSTM runs it, for the ablation."""
  return sparsify(sgd_steps(learning_rate, weight_decay=weight_decay, clip_norm=clip_norm),
                  average='dense')


def sgd(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1.2e-6,
        clip_norm: float | None = 0.25) -> optax.GradientTransformationExtraArgs:
  """:func:`snt_asgd` without averaging (no averaging state): the SGD phase only."""
  return sparsify(sgd_steps(learning_rate, weight_decay=weight_decay, clip_norm=clip_norm))
