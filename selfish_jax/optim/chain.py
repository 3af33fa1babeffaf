"""The one chain every optimizer here is: clip, decay, [moment], lr factor, lr, last stage."""

from __future__ import annotations

import optax

from selfish_jax.optim.lr_factor import scale_by_lr_factor

# The stage of a chain's state that holds the first moment (momentum, Adam's mu).
FIRST_MOMENT = 'first_moment'


def clip_and_decay(clip_norm: float | None, weight_decay: float) -> optax.GradientTransformation:
  """Global-norm clipping over ALL gradients (inactive positions included, as
  the reference computes it; ``None`` disables it), then L2 weight decay added
  to the clipped gradient, as torch's SGD."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm is not None else []
  return optax.chain(*parts, optax.add_decayed_weights(weight_decay))


def sparse_sgd_chain(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float,
                     clip_norm: float | None, last: optax.GradientTransformation,
                     first_moment: optax.GradientTransformation | None = None
                     ) -> optax.GradientTransformationExtraArgs:
  """``clip_and_decay``, then ``first_moment`` if given, the step's ``lr_factor``,
  the learning rate, and ``last`` (re-masking, or averaging, which masks too).

  A named chain: ``state[FIRST_MOMENT]`` is the moment's state, ``state['last']``
  the last stage's, so a reader of the state names the stage it means.
  """
  stages = [('clip_and_decay', clip_and_decay(clip_norm, weight_decay))]
  if first_moment is not None:
    stages.append((FIRST_MOMENT, first_moment))
  stages += [('lr_factor', scale_by_lr_factor()),
             ('learning_rate', optax.scale_by_learning_rate(learning_rate)), ('last', last)]
  return optax.named_chain(*stages)
