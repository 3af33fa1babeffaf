"""The optimizer axis: any sparse method trains with any of these.

Every optimizer ends by re-masking its updates, so inactive weights stay zero
(``momentum`` and ``adam`` zero their moments there too);
only ``snt_asgd`` (:func:`~selfish_jax.optim.snt_asgd.sparse_averaging`) and
``asgd`` (:func:`~selfish_jax.optim.snt_asgd.dense_averaging`) carry averaging
state (the training loop applies the non-monotone trigger to it). The others
carry no averaging buffers.
"""

from __future__ import annotations

from typing import Any

import optax

from selfish_jax.errors import ConfigError
from selfish_jax.optim.inactive_state import zero_inactive_state
from selfish_jax.optim.snt_asgd import (asgd, clip_and_decay, masked, scale_by_lr_factor, sgd,
                                        snt_asgd)

OPTIMIZERS = ('snt_asgd', 'asgd', 'sgd', 'momentum', 'adam')
# Names under which optax states keep a first moment: optax.trace -> TraceState.trace,
# optax.scale_by_adam -> ScaleByAdamState.mu.
_MOMENTUM_FIELDS = ('trace', 'mu')


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *,
                   weight_decay: float = 1.2e-6, clip_norm: float | None = 0.25,
                   momentum: float = 0.9) -> optax.GradientTransformationExtraArgs:
  """``snt_asgd`` | ``asgd`` | ``sgd`` | ``momentum`` | ``adam``, each with clipping and
  weight decay (``asgd``: dense averaging with one counter, the ablation of ``snt_asgd``)."""
  if name not in OPTIMIZERS:
    raise ConfigError(f'unknown optimizer {name!r}; expected one of {OPTIMIZERS}')
  if name == 'snt_asgd':
    return snt_asgd(learning_rate, weight_decay=weight_decay, clip_norm=clip_norm)
  if name == 'asgd':
    return asgd(learning_rate, weight_decay=weight_decay, clip_norm=clip_norm)
  if name == 'sgd':
    return sgd(learning_rate, weight_decay=weight_decay, clip_norm=clip_norm)
  base = (optax.trace(decay=momentum) if name == 'momentum'
          else optax.scale_by_adam(b1=momentum))
  # Moments of inactive weights are zeroed after every step (the reference's
  # apply_mask), so a regrown weight starts with none.
  return zero_inactive_state(optax.chain(
      *clip_and_decay(clip_norm, weight_decay), base, scale_by_lr_factor(),
      optax.scale_by_learning_rate(learning_rate), masked()))


def momentum_of(opt_state: optax.OptState) -> Any:
  """The first-moment pytree of an optimizer state, found by field name, not type."""
  for field in _MOMENTUM_FIELDS:
    found = optax.tree_utils.tree_get_all_with_path(opt_state, field)
    if len(found) == 1:
      return found[0][1]
  raise ConfigError('this optimizer keeps no momentum (use optimizer momentum or adam)')
