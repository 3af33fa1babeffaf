"""The optimizer axis: any sparse method trains with any of these.

Every optimizer ends in :func:`~selfish_jax.optim.snt_asgd.sparse_averaging`,
which keeps masked weights at zero; only ``snt_asgd`` ever switches its
averaging on (the training loop applies the non-monotone trigger for it).
"""

from __future__ import annotations

from typing import Any

import optax

from selfish_jax.errors import ConfigError
from selfish_jax.optim.snt_asgd import snt_asgd, sparse_averaging

OPTIMIZERS = ('snt_asgd', 'sgd', 'momentum', 'adam')
# Names under which optax states keep a first moment: optax.trace -> TraceState.trace,
# optax.scale_by_adam -> ScaleByAdamState.mu.
_MOMENTUM_FIELDS = ('trace', 'mu')


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *,
                   weight_decay: float = 1.2e-6, clip_norm: float | None = 0.25,
                   momentum: float = 0.9) -> optax.GradientTransformationExtraArgs:
  """``snt_asgd`` | ``sgd`` | ``momentum`` | ``adam``, each with clipping and weight decay."""
  if name not in OPTIMIZERS:
    raise ConfigError(f'unknown optimizer {name!r}; expected one of {OPTIMIZERS}')
  if name in ('snt_asgd', 'sgd'):
    return snt_asgd(learning_rate, weight_decay=weight_decay, clip_norm=clip_norm)
  base = (optax.trace(decay=momentum) if name == 'momentum'
          else optax.scale_by_adam(b1=momentum))
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm is not None else []
  parts += [optax.add_decayed_weights(weight_decay), base,
            optax.scale_by_learning_rate(learning_rate), sparse_averaging()]
  return optax.chain(*parts)


def momentum_of(opt_state: optax.OptState) -> Any:
  """The first-moment pytree of an optimizer state, found by field name, not type."""
  for field in _MOMENTUM_FIELDS:
    found = optax.tree_utils.tree_get_all_with_path(opt_state, field)
    if len(found) == 1:
      return found[0][1]
  raise ConfigError('this optimizer keeps no momentum (use optimizer momentum or adam)')
