"""Stacked LSTM language model with fused gate kernels.

Each LSTM layer keeps its four gates (PyTorch order i, f, g, o) in ONE input
kernel ``[in, 4H]`` and ONE recurrent kernel ``[H, 4H]``, so a single sparsity
mask covers all gates of a matrix and the gates compete for one budget
(Selfish-RNN's cell-gate redistribution). Initialisation matches PyTorch's
``nn.LSTM`` (every LSTM tensor U(-1/sqrt(H), 1/sqrt(H)), two biases) and the
reference model (embedding and decoder U(-0.1, 0.1), decoder bias 0).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Carry = tuple[jax.Array, jax.Array]  # (h, c), each [batch, hidden]

LSTM_GATES = ('i', 'f', 'g', 'o')
INPUT_KERNEL = 'input_kernel'
RECURRENT_KERNEL = 'recurrent_kernel'


def uniform_init(scale: float) -> nn.initializers.Initializer:
  """U(-scale, scale), PyTorch's default for RNN and embedding weights."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


def softmax_nll(features: jax.Array, kernel: jax.Array, bias: jax.Array,
                targets: jax.Array) -> jax.Array:
  """Per-token ``-log softmax(features @ kernel + bias)[target]``.

  The target logit is computed from the gathered kernel columns rather than
  picked out of the ``[N, vocab]`` logits: differentiating a pick scatters
  into a dense ``[N, vocab]`` buffer, which costs XLA:CPU about as much as a
  decoder matmul. The max shift is constant to autodiff (it cancels exactly).
  """
  logits = jnp.dot(features, kernel, preferred_element_type=jnp.float32) + bias
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  log_normaliser = jnp.log(jnp.sum(jnp.exp(logits - shift), axis=-1)) + shift[..., 0]
  target_columns = kernel.T[targets]
  target_logits = jnp.sum(features.astype(jnp.float32) * target_columns.astype(jnp.float32),
                          axis=-1) + bias[targets]
  return log_normaliser - target_logits


class LSTMLayer(nn.Module):
  """One LSTM layer over a time-major window ``[T, B, in]``."""
  hidden_size: int
  compute_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, carry: Carry) -> tuple[jax.Array, Carry]:
    hidden = self.hidden_size
    init = uniform_init(1.0 / math.sqrt(hidden))
    w_in = self.param(INPUT_KERNEL, init, (inputs.shape[-1], 4 * hidden))
    w_rec = self.param(RECURRENT_KERNEL, init, (hidden, 4 * hidden))
    b_in = self.param('input_bias', init, (4 * hidden,))
    b_rec = self.param('recurrent_bias', init, (4 * hidden,))
    dtype = self.compute_dtype
    # The input projection of the whole window is one large matmul; only the
    # recurrent product stays inside the sequential loop.
    steps, batch = inputs.shape[:2]
    projected = jnp.dot(inputs.reshape(steps * batch, -1).astype(dtype), w_in.astype(dtype),
                        preferred_element_type=jnp.float32) + (b_in + b_rec)
    projected = projected.reshape(steps, batch, 4 * hidden)
    w_rec = w_rec.astype(dtype)

    def step(carry: Carry, x_t: jax.Array) -> tuple[Carry, jax.Array]:
      h, c = carry
      gates = x_t + jnp.dot(h.astype(dtype), w_rec, preferred_element_type=jnp.float32)
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    carry, outputs = jax.lax.scan(step, carry, projected)
    return outputs, carry


class StackedLSTMLM(nn.Module):
  """Embedding -> dropout -> N LSTM layers (dropout between) -> dropout -> decoder."""
  vocab_size: int
  emsize: int
  nhid: int
  nlayers: int
  dropout: float = 0.0
  tied: bool = False
  compute_dtype: jnp.dtype = jnp.float32

  def initial_carry(self, batch_size: int) -> tuple[Carry, ...]:
    # Separate buffers, so a jitted step can donate the carry.
    zeros = lambda: jnp.zeros((batch_size, self.nhid), jnp.float32)
    return tuple((zeros(), zeros()) for _ in range(self.nlayers))

  @nn.compact
  def __call__(self, tokens: jax.Array, carry: Sequence[Carry], *, train: bool,
               targets: jax.Array | None = None) -> tuple[jax.Array, tuple[Carry, ...]]:
    """Runs ``tokens [B, T]`` from ``carry``.

    Returns:
      ``(logits [B, T, vocab], carry)``, or with ``targets [B, T]`` the
      per-token negative log-likelihood ``[B, T]`` instead of the logits
      (cheaper to differentiate, see :func:`softmax_nll`).
    """
    if self.tied and self.emsize != self.nhid:
      raise ValueError('tied weights need emsize == nhid')
    drop = nn.Dropout(self.dropout, deterministic=not train)
    embedding = self.param('embedding', uniform_init(0.1), (self.vocab_size, self.emsize))
    x = drop(jnp.take(embedding, tokens.T, axis=0))  # time-major [T, B, E] for the scans
    new_carry = []
    for layer in range(self.nlayers):
      x, layer_carry = LSTMLayer(self.nhid, self.compute_dtype, name=f'lstm_{layer}')(
          x, carry[layer])
      new_carry.append(layer_carry)
      x = drop(x)  # between layers and, after the last, on the output
    if self.tied:
      kernel = embedding.T
    else:
      kernel = self.param('decoder_kernel', uniform_init(0.1), (self.nhid, self.vocab_size))
    bias = self.param('decoder_bias', nn.initializers.zeros_init(), (self.vocab_size,))
    dtype = self.compute_dtype
    x = x.astype(dtype)  # [T, B, H]
    kernel = kernel.astype(dtype)
    if targets is not None:
      steps, batch = x.shape[:2]
      nll = softmax_nll(x.reshape(steps * batch, -1), kernel, bias, targets.T.reshape(-1))
      return nll.reshape(steps, batch).T, tuple(new_carry)
    logits = jnp.dot(x, kernel, preferred_element_type=jnp.float32) + bias
    return jnp.swapaxes(logits, 0, 1), tuple(new_carry)
