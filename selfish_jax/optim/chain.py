"""The steps every optimizer here takes before :func:`~selfish_jax.optim.sparsify`'s
last stage: clip, decay, [moment], lr factor, learning rate."""

from __future__ import annotations

import optax

from selfish_jax.optim.lr_factor import scale_by_lr_factor


def clip_and_decay(clip_norm: float | None, weight_decay: float) -> optax.GradientTransformation:
  """Global-norm clipping over ALL gradients (inactive positions included, as
  the reference computes it; ``None`` disables it), then L2 weight decay added
  to the clipped gradient, as torch's SGD."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm is not None else []
  return optax.chain(*parts, optax.add_decayed_weights(weight_decay))


def sgd_steps(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float,
              clip_norm: float | None, moment: optax.GradientTransformation | None = None
              ) -> optax.GradientTransformationExtraArgs:
  """``clip_and_decay``, then ``moment`` if given (``optax.trace``,
  ``optax.scale_by_adam``), the step's ``lr_factor``, the learning rate. A
  plain ``optax.chain``: its state is a tuple of optax's NamedTuples, and the
  moment is found by its field name (:func:`~selfish_jax.optim.first_moment`)."""
  stages = [clip_and_decay(clip_norm, weight_decay)]
  if moment is not None:
    stages.append(moment)
  stages += [scale_by_lr_factor(), optax.scale_by_learning_rate(learning_rate)]
  return optax.chain(*stages)
