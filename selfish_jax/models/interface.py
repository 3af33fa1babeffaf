"""The one interface every language-model family implements, and the registry
that builds a family from the config.

The training loop, the steps, the sparse methods, the FLOPs count and the
benchmarks only use :class:`LanguageModel`; ``config.model`` is read in one
place, :func:`build_model`.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections

from selfish_jax.errors import ConfigError
from selfish_jax.models import lstm, mos, onlstm, rhn
from selfish_jax.models.family import SHARED_KEYS, Family
from selfish_jax.models.layers import GateBlocks

PyTree = Any


class OutputHead(Protocol):
  """What a language model's forward pass ends in: the output layer's inputs,
  turned into logits or losses by the entry point that needs them
  (:class:`~selfish_jax.models.softmax.SoftmaxHead`, or MoS's mixture)."""

  def logits(self) -> jax.Array:
    """``[B, T, vocab]`` (log-probabilities up to a constant per token)."""

  def token_nll(self, targets: jax.Array) -> jax.Array:
    """The negative log-likelihood ``[B, T]`` of ``targets [B, T]``."""

  def weighted_nll_sum(self, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """The scalar ``sum(weights * token_nll(targets))``: the training and
    evaluation loss, computed however is cheapest to differentiate."""


class LanguageModel(Protocol):
  """A Flax language model over time windows, with a carried recurrent state.

  Every ``ndim >= 2`` parameter is a weight matrix the sparse methods mask;
  gates of one matrix are fused into one kernel, described by
  :meth:`gate_layout`. Callers use the entry points :func:`logits`,
  :func:`token_nll` and :func:`eval_nll_sum` (or apply the module and ask
  its head).
  """

  def initial_carry(self, batch_size: int) -> PyTree:
    """The zero state at the start of a split (fresh buffers: steps donate it)."""

  def __call__(self, tokens: jax.Array, carry: PyTree, *, train: bool,
               weights: jax.Array | None = None) -> tuple[OutputHead, PyTree]:
    """``tokens [B, T]`` -> ``(head, carry)``. With ``weights [B, T]`` the state
    is held through steps of weight 0 (padding). Training penalties (AR/TAR)
    are sown into the ``'penalties'`` collection."""

  def gate_layout(self, names: tuple[str, ...], shape: tuple[int, ...]) -> GateBlocks | None:
    """``((gate, columns), ...)`` along the last axis of a fused gate kernel
    (``names``: the leaf's path of dict keys), None for other leaves."""

  def weight_uses(self, names: tuple[str, ...]) -> int:
    """How many times each weight of a matrix multiplies per token in the forward
    pass (0 for a pure lookup): what FLOPs counts multiply the active weights by."""


def _common(config: ml_collections.ConfigDict, num_devices: int) -> dict:
  """The constructor arguments every family takes."""
  # The traced batch is the global one: loss_chunk_rows counts rows per device.
  chunk_devices = 1 if config.gradient_groups else num_devices  # (groups see local rows)
  return dict(emsize=config.emsize, nhid=config.nhid, tied=config.tied, dropout=config.dropout,
              compute_dtype=jnp.dtype(config.compute_dtype),
              loss_chunk_rows=config.loss_chunk_rows * chunk_devices)


def _family_values(config: ml_collections.ConfigDict) -> dict:
  """The values ``config.model``'s family reads, by key: its own keys and the shared ones."""
  return {key: config[key] for key in (*SHARED_KEYS, *sorted(FAMILIES[config.model].keys))}


# A new family: its module ends with a FAMILY (models/family.py), listed here.
FAMILIES: dict[str, Family] = {family.name: family for family in (
    lstm.FAMILY, rhn.FAMILY, onlstm.FAMILY, mos.FAMILY)}
MODELS = tuple(FAMILIES)


def family_defaults() -> dict:
  """Every family's own config keys with their defaults (a key that several
  families read has one default)."""
  defaults = {}
  for family in FAMILIES.values():
    for key, value in family.defaults.items():
      if defaults.setdefault(key, value) != value:
        raise ValueError(f'families disagree on the default of {key!r}')
  return defaults


def check_model_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an unknown ``config.model``, a model-specific key
  set away from its default but not read by ``config.model`` (it would
  silently do nothing), or a value the family cannot build."""
  if config.model not in FAMILIES:
    raise ConfigError(f'unknown model {config.model!r}; expected one of {tuple(FAMILIES)}')
  defaults = family_defaults()
  # Keys some other family reads: under this model they must keep their defaults.
  unused = sorted(k for k in set(defaults) - FAMILIES[config.model].keys
                  if config[k] != defaults[k])
  if unused:
    users = {k: [m for m, f in FAMILIES.items() if k in f.keys] for k in unused}
    raise ConfigError(f'model {config.model!r} does not use ' + ', '.join(
        f'{k} (used by {", ".join(users[k])})' for k in unused))
  FAMILIES[config.model].check(_family_values(config))


def build_model(config: ml_collections.ConfigDict, vocab_size: int,
                num_devices: int = 1) -> LanguageModel:
  """The ``config.model`` family with the config's sizes and regularisers, for a
  batch split over ``num_devices`` devices (the loss chunks' rows are per device)."""
  if config.model not in FAMILIES:
    raise ConfigError(f'unknown model {config.model!r}; expected one of {tuple(FAMILIES)}')
  return FAMILIES[config.model].build(_family_values(config), vocab_size,
                                      _common(config, num_devices))


def logits(model: LanguageModel, params: PyTree, tokens: jax.Array, carry: PyTree
           ) -> tuple[jax.Array, PyTree]:
  """``(logits [B, T, vocab], carry)`` of ``tokens [B, T]`` in evaluation mode."""
  head, carry = model.apply({'params': params}, tokens, carry, train=False)
  return head.logits(), carry


def token_nll(model: LanguageModel, params: PyTree, tokens: jax.Array, carry: PyTree,
              targets: jax.Array) -> tuple[jax.Array, PyTree]:
  """``(NLL [B, T] of targets, carry)`` in evaluation mode."""
  head, carry = model.apply({'params': params}, tokens, carry, train=False)
  return head.token_nll(targets), carry


def eval_nll_sum(model: LanguageModel, params: PyTree, tokens: jax.Array, carry: PyTree,
                 targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, PyTree]:
  """``(sum(weights * NLL), carry)`` in evaluation mode, the state held through
  steps of weight 0 (the training step applies the model itself, with dropout
  and penalties)."""
  head, carry = model.apply({'params': params}, tokens, carry, train=False, weights=weights)
  return head.weighted_nll_sum(targets, weights), carry


def init_params(model: LanguageModel, key: jax.Array) -> PyTree:
  """The model's initial parameters (one jitted call)."""
  return jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32), model.initial_carry(1),
                                      train=False)['params'])(key)
