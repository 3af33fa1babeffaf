"""The optimizer axis: any sparse method trains with any of these, and the one
table (:data:`OPTIMIZERS`) that config, experiments.compare and the core ask
about them.

Every optimizer is :func:`~selfish_jax.optim.sparsify` of SGD-like steps, so it
ends by re-masking its updates (inactive weights stay zero; ``momentum`` and
``adam`` zero their moments there too); only ``snt_asgd`` (sparse averaging)
and ``asgd`` (dense averaging) carry averaging state, which the training loop
switches on at the trigger.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from selfish_jax.errors import ConfigError
from selfish_jax.optim.chain import sgd_steps
from selfish_jax.optim.snt_asgd import asgd, sgd, snt_asgd
from selfish_jax.optim.sparsify import sparsify
from selfish_jax.sparsity.masks import is_masked_node

PyTree = Any
Factory = Callable[..., optax.GradientTransformationExtraArgs]


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
  """One ``config.optimizer``.

  Attributes:
    build: ``build(learning_rate, *, weight_decay, clip_norm, momentum)``.
    first_moment: its state keeps a first moment (what growth by momentum ranks).
    sgd_phase: before averaging starts it takes plain SGD steps and keeps no
      state, so runs of two such optimizers are the same until then (a sweep
      trains an ``sgd`` cell only if its ``snt_asgd`` twin switched, and
      forks continuations at the switch).
    sweep_lr: the learning rate a sweep (experiments.compare) gives it, or
      None for the config's ``lr``.
  """
  build: Factory
  first_moment: bool = False
  sgd_phase: bool = False
  sweep_lr: float | None = None


def _sgd_like(optimizer: Callable[..., optax.GradientTransformationExtraArgs]) -> Factory:
  """The factory of ``snt_asgd``, ``asgd`` or ``sgd`` (no momentum to take)."""
  def build(learning_rate, *, weight_decay, clip_norm, momentum):
    del momentum
    return optimizer(learning_rate, weight_decay=weight_decay, clip_norm=clip_norm)
  return build


def _with_moment(moment: Callable[[float], optax.GradientTransformation]) -> Factory:
  def build(learning_rate, *, weight_decay, clip_norm, momentum):
    return sparsify(sgd_steps(learning_rate, weight_decay=weight_decay, clip_norm=clip_norm,
                              moment=moment(momentum)))
  return build


# Every optimizer by its config.optimizer name. Register your own here; config,
# experiments.compare and the core read these fields, nothing else.
OPTIMIZERS: dict[str, OptimizerEntry] = {
    'snt_asgd': OptimizerEntry(_sgd_like(snt_asgd), sgd_phase=True),
    'asgd': OptimizerEntry(_sgd_like(asgd), sgd_phase=True),
    'sgd': OptimizerEntry(_sgd_like(sgd), sgd_phase=True),
    'momentum': OptimizerEntry(_with_moment(lambda b: optax.trace(decay=b)), first_moment=True,
                               sweep_lr=2.0),
    'adam': OptimizerEntry(_with_moment(lambda b: optax.scale_by_adam(b1=b)), first_moment=True,
                           sweep_lr=2e-3),
}


def optimizer_entry(name: str) -> OptimizerEntry:
  if name not in OPTIMIZERS:
    raise ConfigError(f'unknown optimizer {name!r}; expected one of {tuple(OPTIMIZERS)}')
  return OPTIMIZERS[name]


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *,
                   weight_decay: float = 1.2e-6, clip_norm: float | None = 0.25,
                   momentum: float = 0.9) -> optax.GradientTransformationExtraArgs:
  """The optimizer ``name`` of :data:`OPTIMIZERS`, each with clipping and weight
  decay (``asgd``: dense averaging with one counter, the ablation of
  ``snt_asgd``; ``momentum``: SGD momentum ``momentum``; ``adam``: its b1)."""
  return optimizer_entry(name).build(learning_rate, weight_decay=weight_decay,
                                     clip_norm=clip_norm, momentum=momentum)


# Where optax keeps a first moment: optax.scale_by_adam's ScaleByAdamState.mu,
# optax.trace's TraceState.trace (and every optimizer built on them).
FIRST_MOMENT_FIELDS = ('mu', 'trace')


def first_moment(opt_state: optax.OptState) -> PyTree:
  """The first moment (what SNFS's momentum growth ranks) of any optimizer state
  that keeps one, found by its field name wherever it sits in the state (a
  chain, ``inject_hyperparams``, the groups of ``optax.partition``, whose
  moments are merged into one tree)."""
  found = [value for name in FIRST_MOMENT_FIELDS
           for _, value in optax.tree_utils.tree_get_all_with_path(opt_state, name)]
  if not found:
    raise ConfigError(f'this optimizer state keeps no first moment (no field named one of '
                      f'{FIRST_MOMENT_FIELDS}, as optax.trace and optax.scale_by_adam keep): '
                      'growth by momentum needs an optimizer with momentum')
  return jax.tree.map(
      lambda *values: next((v for v in values if not is_masked_node(v)), values[0]),
      *found, is_leaf=is_masked_node)
