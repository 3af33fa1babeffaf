"""Pieces every language-model family shares: initialisers, the regularisers of
AWD-LSTM (embedding dropout, locked dropout, DropConnect, AR/TAR) and the
freezing of the recurrent state on padded steps.

All dropouts draw from the ``'dropout'`` RNG stream of the calling module and
are identities when ``rate == 0`` or ``not train``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfish_jax.errors import ConfigError
from selfish_jax.checks import check_fractions

GateBlocks = tuple[tuple[str, int], ...]  # (gate name, columns) along a fused kernel's last axis
PENALTIES = 'penalties'  # the Flax collection models sow training penalties into


def uniform_init(scale: float) -> nn.initializers.Initializer:
  """U(-scale, scale), PyTorch's default for RNN and embedding weights."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


def linear_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's ``nn.Linear`` default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for kernel and bias."""
  return uniform_init(1.0 / fan_in ** 0.5)


def project(inputs: jax.Array, kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """``inputs [T, B, in] @ kernel [in, out]`` -> ``[T, B, out]`` in float32, without
  merging time and batch: a batch split over devices stays split (a
  ``[T*B, in]`` reshape would make XLA gather it on every device)."""
  return jnp.einsum('tbi,io->tbo', inputs.astype(dtype), kernel.astype(dtype),
                    preferred_element_type=jnp.float32)


def equal_gates(names: Sequence[str], columns: int) -> GateBlocks:
  """``len(names)`` gates of equal width side by side in ``columns`` columns."""
  if columns % len(names):
    raise ValueError(f'{columns} columns do not split into {len(names)} gates')
  return tuple((name, columns // len(names)) for name in names)


def _keep_mask(module: nn.Module, rate: float, shape: Sequence[int]) -> jax.Array:
  """Inverted-dropout multipliers: 0 with probability ``rate``, else ``1 / (1 - rate)``."""
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, shape)
  return keep.astype(jnp.float32) / (1.0 - rate)


def locked_dropout(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Variational dropout of time-major ``x [T, B, F]``: one mask per sequence, reused at
  every step."""
  if not train or rate == 0.0:
    return x
  return x * _keep_mask(module, rate, (1,) + x.shape[1:]).astype(x.dtype)


def embedding_dropout(module: nn.Module, embedding: jax.Array, rate: float,
                      train: bool) -> jax.Array:
  """Drops whole words: rows of the ``[vocab, E]`` embedding, one mask per batch (AWD-LSTM)."""
  if not train or rate == 0.0:
    return embedding
  return embedding * _keep_mask(module, rate, (embedding.shape[0], 1)).astype(embedding.dtype)


def drop_connect(module: nn.Module, kernel: jax.Array, rate: float, train: bool, *,
                 inverted: bool = True) -> jax.Array:
  """DropConnect on a weight matrix, one mask per batch.

  ``inverted=True`` is AWD-LSTM's ``WeightDrop`` (kept weights times
  ``1 / (1 - rate)`` in training, the weights as they are at evaluation);
  ``inverted=False`` is ON-LSTM's ``LinearDropConnect`` (kept weights as they
  are in training, all of them times ``1 - rate`` at evaluation). The two give
  the same function up to a constant factor on the weights, but not the same
  training: the inverted weights start ``1 / (1 - rate)`` larger, take larger
  steps and weigh more in the global clip norm.
  """
  if rate == 0.0:
    return kernel
  if not train:
    return kernel if inverted else kernel * (1.0 - rate)
  if inverted:
    return kernel * _keep_mask(module, rate, kernel.shape).astype(kernel.dtype)
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, kernel.shape)
  return jnp.where(keep, kernel, jnp.zeros_like(kernel))


def embedded_words(module: nn.Module, embedding: jax.Array, tokens: jax.Array,
                   dropout_embedding: float, dropout_input: float, train: bool) -> jax.Array:
  """Time-major ``[T, B, E]`` embeddings of ``tokens [B, T]`` with AWD-LSTM's input
  regularisation: whole words dropped, then locked dropout."""
  table = embedding_dropout(module, embedding, dropout_embedding, train)
  return locked_dropout(module, jnp.take(table, tokens.T, axis=0), dropout_input, train)


def decoder_params(module: nn.Module, embedding: jax.Array, tied: bool, features: int,
                   init: nn.initializers.Initializer) -> tuple[jax.Array, jax.Array]:
  """``(kernel [features, vocab], bias)`` of the softmax: the embedding's transpose
  when ``tied``, else a ``decoder_kernel`` of its own; ``decoder_bias`` starts at 0."""
  vocab_size = embedding.shape[0]
  kernel = embedding.T if tied else module.param('decoder_kernel', init, (features, vocab_size))
  bias = module.param('decoder_bias', nn.initializers.zeros_init(), (vocab_size,))
  return kernel, bias


def tied_embedding_uses(names: tuple[str, ...], tied: bool) -> int:
  """``weight_uses`` of a model with one softmax: the embedding is a lookup unless
  it is also the decoder; every other matrix multiplies once per token."""
  if names[-1] == 'embedding':
    return 1 if tied else 0
  return 1


# The AWD-LSTM regularisers (onlstm, awd_lstm_mos): config keys and defaults.
AWD_REGULARISERS = {
    'dropout_input': 0.0,  # locked, on the embedded input
    'dropout_hidden': 0.0,  # locked, between layers
    'dropout_embedding': 0.0,  # whole words
    'weight_drop': 0.0,  # DropConnect on the recurrent kernels
    'ar_alpha': 0.0,  # activation regularisation
    'tar_beta': 0.0,  # temporal activation regularisation
}


def check_awd_regularisers(values) -> None:
  """Raises ConfigError for a dropout outside [0, 1) or a negative AR/TAR weight."""
  check_fractions(values, ('dropout_input', 'dropout_hidden', 'dropout_embedding', 'weight_drop'))
  for key in ('ar_alpha', 'tar_beta'):
    if values[key] < 0:
      raise ConfigError(f'{key} must be >= 0, got {values[key]!r}')


def awd_stack(module: nn.Module, cells: Sequence[nn.Module], x: jax.Array, carry: Sequence,
              valid: jax.Array | None, train: bool, *, dropout_hidden: float, dropout: float,
              ar_alpha: float, tar_beta: float, ar_of_dropped: bool = True
              ) -> tuple[jax.Array, tuple]:
  """AWD-LSTM's layer stack: each ``cell(x, carry, valid, train)`` in turn, locked
  dropout between layers (``dropout_hidden``) and after the last (``dropout``),
  AR/TAR of the last layer sown in training. Returns ``(output, carries)``.

  AR penalises the last layer's output after its dropout when
  ``ar_of_dropped`` (AWD-LSTM's and MoS's ``dropped_rnn_hs[-1]``), before it
  otherwise (ON-LSTM, whose stack hands back the undropped last output);
  TAR always penalises the undropped output.
  """
  new_carry = []
  for layer, cell in enumerate(cells):
    raw, layer_carry = cell(x, carry[layer], valid, train)
    new_carry.append(layer_carry)
    last = layer == len(cells) - 1
    x = locked_dropout(module, raw, dropout if last else dropout_hidden, train)
  if train:
    sow_activation_penalties(module, x if ar_of_dropped else raw, raw, valid, ar_alpha, tar_beta)
  return x, tuple(new_carry)


def time_valid(weights: jax.Array | None) -> jax.Array | None:
  """``[T, B, 1]`` booleans, True at real (unpadded) steps of batch-major ``weights [B, T]``.

  Padding sits after the real steps of a window; recurrences keep their state
  unchanged through it, so a padded window ends in the state of its last real
  step (variable-length BPTT pads every window to one length).
  """
  return None if weights is None else (weights.T > 0)[..., None]


def hold_on_padding(valid_t: jax.Array | None, new: jax.Array, old: jax.Array) -> jax.Array:
  """``new`` at real steps, ``old`` (the state before the step) at padded ones."""
  return new if valid_t is None else jnp.where(valid_t, new, old)


def sow_activation_penalties(module: nn.Module, activation: jax.Array, raw: jax.Array,
                             valid: jax.Array | None, alpha: float, beta: float) -> None:
  """Sows AWD-LSTM's activation regularisers of the last layer's output ``[T, B, H]``.

  AR: ``alpha * mean(activation ** 2)``; TAR: ``beta * mean((raw[t+1] - raw[t]) ** 2)``,
  both over real steps only. The training loss adds everything sown in the
  :data:`PENALTIES` collection.
  """
  if valid is None:
    valid = jnp.ones(activation.shape[:2] + (1,), bool)
  valid = valid.astype(jnp.float32)
  width = activation.shape[-1]
  if alpha:
    ar = jnp.sum(valid * jnp.square(activation)) / (jnp.sum(valid) * width)
    module.sow(PENALTIES, 'activation', alpha * ar)
  if beta and raw.shape[0] > 1:
    pairs = valid[1:] * valid[:-1]
    tar = jnp.sum(pairs * jnp.square(raw[1:] - raw[:-1])) / jnp.maximum(jnp.sum(pairs) * width, 1)
    module.sow(PENALTIES, 'temporal_activation', beta * tar)


def total_penalty(collections: dict) -> jax.Array:
  """The sum of every penalty sown into :data:`PENALTIES` (0 if none)."""
  leaves = jax.tree.leaves(collections.get(PENALTIES, {}))
  return sum(leaves, jnp.float32(0.0))
