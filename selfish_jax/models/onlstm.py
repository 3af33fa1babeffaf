"""Ordered-Neurons LSTM language model (Shen et al., 2019), AWD-regularised.

Each layer's cell is split into ``H / chunk_size`` chunks ordered by level.
Two master gates of one value per chunk, ``cumax = cumsum(softmax(.))``,
decide which levels are erased and written::

  fm = cumax(x Wf + h Uf)          im = 1 - cumax(x Wi + h Ui)
  w = fm * im (per chunk, broadcast over its units)
  f = sigmoid(.) * w + (fm - w)    i = sigmoid(.) * w + (im - w)
  c = f * c + i * tanh(.)          h = sigmoid(.) * tanh(c)

All six gates of a matrix live in ONE fused kernel, in the official code's
column order ``[master_i (n), master_f (n), o (H), g (H), i (H), f (H)]``, so
the four gates and the two master gates share one mask and one budget.
DropConnect (``weight_drop``) masks the recurrent kernel once per window,
unscaled in training and scaled by ``1 - weight_drop`` at evaluation, and AR
penalises the last layer's output before its dropout: both as the official
ON-LSTM code (``ON_LSTM.py``, ``main_ONLSTM.py``) does, unlike AWD-LSTM.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfish_jax.errors import ConfigError
from selfish_jax.models import layers
from selfish_jax.checks import check_int
from selfish_jax.models.family import Family, pick
from selfish_jax.models.layers import GateBlocks, linear_init, uniform_init
from selfish_jax.models.lstm import Carry, zero_carry
from selfish_jax.models.softmax import SoftmaxHead

ONLSTM_GATES = ('master_i', 'master_f', 'o', 'g', 'i', 'f')
INPUT_KERNEL = 'input_kernel'
RECURRENT_KERNEL = 'recurrent_kernel'


def cumax(x: jax.Array) -> jax.Array:
  """``cumsum(softmax(x))`` along the last axis: a soft, monotone 0 -> 1 step."""
  return jnp.cumsum(jax.nn.softmax(x, axis=-1), axis=-1)


def onlstm_gate_blocks(columns: int, chunk_size: int) -> GateBlocks:
  """The gate widths of a fused ``[in, 4H + 2H/chunk_size]`` kernel."""
  hidden, remainder = divmod(columns * chunk_size, 4 * chunk_size + 2)
  if remainder or hidden % chunk_size:
    raise ValueError(f'{columns} columns are no ON-LSTM layer with chunk size {chunk_size}')
  chunks = hidden // chunk_size
  return tuple(zip(ONLSTM_GATES, (chunks, chunks, hidden, hidden, hidden, hidden)))


def onlstm_cell(pre: jax.Array, c_prev: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """One step from the fused pre-activations ``[B, 2n + 4H]``: ``(h, c)``."""
  hidden = c_prev.shape[-1]
  chunks = hidden // chunk_size
  master_i = 1.0 - cumax(pre[:, :chunks])
  master_f = cumax(pre[:, chunks:2 * chunks])
  o, g, i, f = jnp.split(pre[:, 2 * chunks:], 4, axis=-1)
  master_i = jnp.repeat(master_i, chunk_size, axis=-1)  # per chunk -> per unit
  master_f = jnp.repeat(master_f, chunk_size, axis=-1)
  overlap = master_f * master_i
  f = jax.nn.sigmoid(f) * overlap + (master_f - overlap)
  i = jax.nn.sigmoid(i) * overlap + (master_i - overlap)
  c = f * c_prev + i * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


class ONLSTMLayer(nn.Module):
  """One ON-LSTM layer over a time-major window ``[T, B, in]``; PyTorch ``nn.Linear`` init."""
  hidden_size: int
  chunk_size: int
  weight_drop: float = 0.0
  compute_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, carry: Carry, valid: jax.Array | None,
               train: bool) -> tuple[jax.Array, Carry]:
    hidden, dtype = self.hidden_size, self.compute_dtype
    if hidden % self.chunk_size:
      raise ValueError(f'hidden size {hidden} is not a multiple of chunk size {self.chunk_size}')
    columns = 4 * hidden + 2 * (hidden // self.chunk_size)
    fan_in = inputs.shape[-1]
    w_in = self.param(INPUT_KERNEL, linear_init(fan_in), (fan_in, columns))
    b_in = self.param('input_bias', linear_init(fan_in), (columns,))
    w_rec = self.param(RECURRENT_KERNEL, linear_init(hidden), (hidden, columns))
    b_rec = self.param('recurrent_bias', linear_init(hidden), (columns,))
    # The official LinearDropConnect: unscaled in training, x (1 - p) at evaluation.
    w_rec = layers.drop_connect(self, w_rec, self.weight_drop, train, inverted=False).astype(dtype)
    projected = layers.project(inputs, w_in, dtype) + (b_in + b_rec)

    def step(carry, inputs_t):
      x_t, valid_t = inputs_t
      h_prev, c_prev = carry
      pre = x_t + jnp.dot(h_prev.astype(dtype), w_rec, preferred_element_type=jnp.float32)
      h, c = onlstm_cell(pre, c_prev, self.chunk_size)
      h = layers.hold_on_padding(valid_t, h, h_prev)
      c = layers.hold_on_padding(valid_t, c, c_prev)
      return (h, c), h

    carry, outputs = jax.lax.scan(step, carry, (projected, valid))
    return outputs, carry


class ONLSTMLM(nn.Module):
  """Embedding -> ON-LSTM stack -> tied decoder, AWD-LSTM regularised (``config.model = 'onlstm'``).

  Layer sizes ``emsize -> nhid x (nlayers - 1) -> emsize`` as in the official
  code (the last layer's size is the embedding's, for tying).
  """
  vocab_size: int
  emsize: int
  nhid: int
  nlayers: int = 3
  chunk_size: int = 10
  tied: bool = True
  dropout: float = 0.0  # locked, on the output
  dropout_input: float = 0.0  # locked, on the embedded input
  dropout_hidden: float = 0.0  # locked, between layers
  dropout_embedding: float = 0.0  # whole words
  weight_drop: float = 0.0  # DropConnect on the recurrent kernels
  ar_alpha: float = 0.0
  tar_beta: float = 0.0
  compute_dtype: jnp.dtype = jnp.float32
  loss_chunk_rows: int = 128

  @property
  def hidden_sizes(self) -> Sequence[int]:
    return [self.nhid] * (self.nlayers - 1) + [self.emsize]

  def initial_carry(self, batch_size: int) -> tuple[Carry, ...]:
    return zero_carry(batch_size, self.hidden_sizes)

  def gate_layout(self, names: tuple[str, ...], shape: tuple[int, ...]) -> GateBlocks | None:
    if names[-1] in (INPUT_KERNEL, RECURRENT_KERNEL):
      return onlstm_gate_blocks(shape[-1], self.chunk_size)
    return None

  def weight_uses(self, names: tuple[str, ...]) -> int:
    return layers.tied_embedding_uses(names, self.tied)

  @nn.compact
  def __call__(self, tokens: jax.Array, carry: Sequence[Carry], *, train: bool,
               weights: jax.Array | None = None) -> tuple[SoftmaxHead, tuple[Carry, ...]]:
    """The :class:`~selfish_jax.models.interface.LanguageModel` forward pass; in
    training the AR/TAR penalties are sown into ``'penalties'``."""
    valid = layers.time_valid(weights)
    embedding = self.param('embedding', uniform_init(0.1), (self.vocab_size, self.emsize))
    x = layers.embedded_words(self, embedding, tokens, self.dropout_embedding, self.dropout_input,
                              train)
    cells = [ONLSTMLayer(hidden, self.chunk_size, self.weight_drop, self.compute_dtype,
                         name=f'onlstm_{layer}') for layer, hidden in enumerate(self.hidden_sizes)]
    x, new_carry = layers.awd_stack(self, cells, x, carry, valid, train,
                                    dropout_hidden=self.dropout_hidden, dropout=self.dropout,
                                    ar_alpha=self.ar_alpha, tar_beta=self.tar_beta,
                                    ar_of_dropped=False)  # as main_ONLSTM.py: the raw output
    kernel, bias = layers.decoder_params(self, embedding, self.tied, self.emsize, uniform_init(0.1))
    dtype = self.compute_dtype
    head = SoftmaxHead(x.astype(dtype), kernel.astype(dtype), bias, self.loss_chunk_rows)
    return head, new_carry


def _check(values) -> None:
  check_int(values, 'chunk_size')
  layers.check_awd_regularisers(values)
  for size in (values['nhid'], values['emsize']):
    if size % values['chunk_size']:
      raise ConfigError(f'onlstm layer size {size} is not a multiple of '
                        f'chunk_size={values["chunk_size"]}')


FAMILY = Family('onlstm', {
    'chunk_size': 10,  # units per master-gate level
    **layers.AWD_REGULARISERS,
}, lambda values, vocab_size, common: ONLSTMLM(
    vocab_size=vocab_size, nlayers=values['nlayers'], chunk_size=values['chunk_size'],
    **pick(values, layers.AWD_REGULARISERS), **common), _check)
