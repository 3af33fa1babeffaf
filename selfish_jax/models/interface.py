"""The one interface every language-model family implements, and the registry
that builds a family from the config.

The training loop, the steps, the sparse methods, the FLOPs count and the
benchmarks only use :class:`LanguageModel`; ``config.model`` is read in one
place, :func:`build_model`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from selfish_jax.errors import ConfigError
from selfish_jax.models.layers import GateBlocks
from selfish_jax.models.lstm import StackedLSTMLM
from selfish_jax.models.mos import AWDLSTMMoSLM
from selfish_jax.models.onlstm import ONLSTMLM
from selfish_jax.models.rhn import RHN_INITS, RHNLM, ZILLY_INIT_SCALE, ZILLY_TRANSFORM_BIAS

PyTree = Any


class LanguageModel(Protocol):
  """A Flax language model over time windows, with a carried recurrent state.

  Every ``ndim >= 2`` parameter is a weight matrix the sparse methods mask;
  gates of one matrix are fused into one kernel, described by
  :meth:`gate_layout`.
  """

  def initial_carry(self, batch_size: int) -> PyTree:
    """The zero state at the start of a split (fresh buffers: steps donate it)."""

  def __call__(self, tokens: jax.Array, carry: PyTree, *, train: bool,
               targets: jax.Array | None = None,
               weights: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
    """``tokens [B, T]`` -> ``(out, carry)``: logits ``[B, T, vocab]``; with
    ``targets`` the NLL ``[B, T]``; with ``targets`` and ``weights`` the scalar
    ``sum(weights * nll)``, the state held through steps of weight 0. Training
    penalties (AR/TAR) are sown into the ``'penalties'`` collection."""

  def gate_layout(self, names: tuple[str, ...], shape: tuple[int, ...]) -> GateBlocks | None:
    """``((gate, columns), ...)`` along the last axis of a fused gate kernel
    (``names``: the leaf's path of dict keys), None for other leaves."""

  def weight_uses(self, names: tuple[str, ...]) -> int:
    """How many times each weight of a matrix multiplies per token in the forward
    pass (0 for a pure lookup): what FLOPs counts multiply the active weights by."""


@dataclasses.dataclass(frozen=True)
class Family:
  """How one ``config.model`` reads the config: its own keys, their
  constraints (``check`` raises ConfigError) and its constructor."""
  keys: frozenset[str]
  build: Callable[[ml_collections.ConfigDict, int, dict], nn.Module]
  check: Callable[[ml_collections.ConfigDict], None] = lambda config: None


def _common(config: ml_collections.ConfigDict, num_devices: int) -> dict:
  # The traced batch is the global one: loss_chunk_rows counts rows per device.
  chunk_devices = 1 if config.gradient_groups else num_devices  # (groups see local rows)
  return dict(emsize=config.emsize, nhid=config.nhid, tied=config.tied, dropout=config.dropout,
              compute_dtype=jnp.dtype(config.compute_dtype),
              loss_chunk_rows=config.loss_chunk_rows * chunk_devices)


_AWD_REGULARISERS = ('dropout_input', 'dropout_hidden', 'dropout_embedding', 'weight_drop',
                     'ar_alpha', 'tar_beta')


def _pick(config, keys: Sequence[str]) -> dict:
  return {k: config[k] for k in keys}


def _check_tied_square(config):
  if config.tied and config.emsize != config.nhid:
    raise ConfigError(f'tied weights need emsize == nhid, got {config.emsize} and {config.nhid}')


def _check_rhn(config):
  _check_tied_square(config)
  if config.nlayers != 1:
    raise ConfigError(f'model rhn has one recurrent layer (its depth is rhn_depth); '
                      f'nlayers must be 1, got {config.nlayers}')
  if config.rhn_init not in RHN_INITS:
    raise ConfigError(f'unknown rhn_init {config.rhn_init!r}; expected one of {RHN_INITS}')
  if config.rhn_init != 'zilly':
    for key, default in (('rhn_transform_bias', ZILLY_TRANSFORM_BIAS),
                         ('rhn_init_scale', ZILLY_INIT_SCALE)):
      if config[key] != default:
        raise ConfigError(f"{key} is read only with rhn_init='zilly', not {config.rhn_init!r}")


def _check_onlstm(config):
  for size in (config.nhid, config.emsize):
    if size % config.chunk_size:
      raise ConfigError(f'onlstm layer size {size} is not a multiple of '
                        f'chunk_size={config.chunk_size}')


def _build_rhn(config, vocab_size, common):
  return RHNLM(vocab_size=vocab_size, depth=config.rhn_depth, init_scheme=config.rhn_init,
               transform_bias=config.rhn_transform_bias, init_scale=config.rhn_init_scale,
               **_pick(config, ('dropout_input', 'dropout_hidden', 'dropout_embedding')), **common)


FAMILIES: dict[str, Family] = {
    'lstm': Family(frozenset({'nlayers'}), lambda config, vocab_size, common: StackedLSTMLM(
        vocab_size=vocab_size, nlayers=config.nlayers, **common), _check_tied_square),
    'rhn': Family(frozenset({'nlayers', 'rhn_depth', 'rhn_init', 'rhn_transform_bias',
                             'rhn_init_scale',
                             'dropout_input', 'dropout_hidden', 'dropout_embedding'}), _build_rhn,
                  _check_rhn),
    'onlstm': Family(frozenset({'nlayers', 'chunk_size', *_AWD_REGULARISERS}),
                     lambda config, vocab_size, common: ONLSTMLM(
                         vocab_size=vocab_size, nlayers=config.nlayers,
                         chunk_size=config.chunk_size, **_pick(config, _AWD_REGULARISERS),
                         **common), _check_onlstm),
    'awd_lstm_mos': Family(frozenset({'nlayers', 'nhid_last', 'n_experts', 'dropout_latent',
                                      *_AWD_REGULARISERS}),
                           lambda config, vocab_size, common: AWDLSTMMoSLM(
                               vocab_size=vocab_size, nlayers=config.nlayers,
                               nhid_last=config.nhid_last or config.emsize,
                               n_experts=config.n_experts, dropout_latent=config.dropout_latent,
                               **_pick(config, _AWD_REGULARISERS), **common)),
}
MODELS = tuple(FAMILIES)
# Keys some family reads: under another model they must keep their defaults.
FAMILY_KEYS = frozenset().union(*(f.keys for f in FAMILIES.values()))


def check_model_config(config: ml_collections.ConfigDict,
                       defaults: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an unknown ``config.model``, a model-specific key
  set away from its default but not read by ``config.model`` (it would
  silently do nothing), or a value the family cannot build."""
  if config.model not in FAMILIES:
    raise ConfigError(f'unknown model {config.model!r}; expected one of {MODELS}')
  unused = sorted(k for k in FAMILY_KEYS - FAMILIES[config.model].keys
                  if config[k] != defaults[k])
  if unused:
    users = {k: [m for m, f in FAMILIES.items() if k in f.keys] for k in unused}
    raise ConfigError(f'model {config.model!r} does not use ' + ', '.join(
        f'{k} (used by {", ".join(users[k])})' for k in unused))
  FAMILIES[config.model].check(config)


def build_model(config: ml_collections.ConfigDict, vocab_size: int,
                num_devices: int = 1) -> LanguageModel:
  """The ``config.model`` family with the config's sizes and regularisers, for a
  batch split over ``num_devices`` devices (the loss chunks' rows are per device)."""
  if config.model not in FAMILIES:
    raise ConfigError(f'unknown model {config.model!r}; expected one of {MODELS}')
  return FAMILIES[config.model].build(config, vocab_size, _common(config, num_devices))


def init_params(model: LanguageModel, key: jax.Array) -> PyTree:
  """The model's initial parameters (one jitted call)."""
  return jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32), model.initial_carry(1),
                                      train=False)['params'])(key)
