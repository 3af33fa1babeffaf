"""The optimizer axis: any sparse method trains with any of these.

Every optimizer ends by re-masking its updates, so inactive weights stay zero
(``momentum`` and ``adam`` zero their moments there too);
only ``snt_asgd`` (sparse averaging) and ``asgd`` (dense averaging) carry
averaging state, which the training loop switches on at the trigger.
"""

from __future__ import annotations

from typing import Any

import optax

from selfish_jax.errors import ConfigError
from selfish_jax.optim.chain import FIRST_MOMENT, sparse_sgd_chain
from selfish_jax.optim.inactive_state import zero_inactive_state
from selfish_jax.optim.remask import remask
from selfish_jax.optim.snt_asgd import asgd, sgd, snt_asgd

OPTIMIZERS = ('snt_asgd', 'asgd', 'sgd', 'momentum', 'adam')
# The first moment of each optimizer that keeps one, read from its chain stage
# (optax.trace's TraceState.trace, optax.scale_by_adam's ScaleByAdamState.mu).
_FIRST_MOMENT_OF = {'momentum': lambda stage: stage.trace, 'adam': lambda stage: stage.mu}


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *,
                   weight_decay: float = 1.2e-6, clip_norm: float | None = 0.25,
                   momentum: float = 0.9) -> optax.GradientTransformationExtraArgs:
  """``snt_asgd`` | ``asgd`` | ``sgd`` | ``momentum`` | ``adam``, each with clipping and
  weight decay (``asgd``: dense averaging with one counter, the ablation of ``snt_asgd``)."""
  if name not in OPTIMIZERS:
    raise ConfigError(f'unknown optimizer {name!r}; expected one of {OPTIMIZERS}')
  if name in ('snt_asgd', 'asgd', 'sgd'):
    return {'snt_asgd': snt_asgd, 'asgd': asgd, 'sgd': sgd}[name](
        learning_rate, weight_decay=weight_decay, clip_norm=clip_norm)
  moment = (optax.trace(decay=momentum) if name == 'momentum'
            else optax.scale_by_adam(b1=momentum))
  # Moments of inactive weights are zeroed after every step (the reference's
  # apply_mask), so a regrown weight starts with none.
  return zero_inactive_state(sparse_sgd_chain(
      learning_rate, weight_decay=weight_decay, clip_norm=clip_norm, first_moment=moment,
      last=remask()))


def first_moment(name: str, opt_state: optax.OptState) -> Any:
  """The first-moment pytree (what SNFS's momentum growth ranks) of the state of
  ``make_optimizer(name, ...)``."""
  if name not in _FIRST_MOMENT_OF:
    raise ConfigError(f'optimizer {name!r} keeps no momentum (use optimizer momentum or adam)')
  return _FIRST_MOMENT_OF[name](opt_state[FIRST_MOMENT])
