"""Stacked LSTM language model with fused gate kernels.

Each LSTM layer keeps its four gates (PyTorch order i, f, g, o) in ONE input
kernel ``[in, 4H]`` and ONE recurrent kernel ``[H, 4H]``, so a single sparsity
mask covers all gates of a matrix and the gates compete for one budget
(Selfish-RNN's cell-gate redistribution). Initialisation matches PyTorch's
``nn.LSTM`` (every LSTM tensor U(-1/sqrt(H), 1/sqrt(H)), two biases) and the
reference model (embedding and decoder U(-0.1, 0.1), decoder bias 0).
"""

from __future__ import annotations

import functools
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


def chunk_steps(steps: int, batch: int, target_rows: int) -> int:
  """Time steps per chunk of the fused loss: the largest divisor of ``steps``
  with at most ``target_rows`` rows (``steps * batch`` rows are not chunked
  when ``target_rows`` is 0)."""
  if target_rows <= 0:
    return steps
  fits = [d for d in range(1, steps + 1) if steps % d == 0 and d * batch <= target_rows]
  return max(fits, default=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def weighted_nll_sum(features: jax.Array, kernel: jax.Array, bias: jax.Array,
                     targets: jax.Array, weights: jax.Array, steps_per_chunk: int) -> jax.Array:
  """``sum(weights * softmax_nll(...))`` over time-major ``features [T, B, H]``.

  Its gradient is computed during the forward pass, ``steps_per_chunk`` time
  steps at a time (the fused softmax cross-entropy of large-vocabulary LMs):
  each ``[rows, vocab]`` tile of logits, probabilities and their gradient stays
  in cache instead of streaming ``[T*B, vocab]`` buffers through memory six or
  more times, which is what bounds the 10,000-way softmax on a CPU. Chunks are
  whole time steps, so a batch sharded over devices stays sharded the same way.
  ``weights`` get no gradient.
  """
  return _plain_weighted_nll_sum(features, kernel, bias, targets, weights)


def _plain_weighted_nll_sum(features, kernel, bias, targets, weights):
  """``sum(weights * nll)`` over time-major ``[T, B]`` tokens, differentiated by autodiff."""
  return jnp.sum(weights * softmax_nll(features.reshape(targets.size, -1), kernel, bias,
                                       targets.reshape(-1)).reshape(targets.shape))


def _weighted_nll_sum_fwd(features, kernel, bias, targets, weights, steps_per_chunk):
  steps, batch, hidden = features.shape
  if steps % steps_per_chunk:
    raise ValueError(f'{steps_per_chunk} steps per chunk do not divide {steps} steps')
  num_chunks, rows = steps // steps_per_chunk, steps_per_chunk * batch
  chunked = lambda a: a.reshape(num_chunks, rows, *a.shape[1:])  # a: [T * B, ...]

  def chunk(carry, inputs):
    d_kernel, d_bias = carry
    x, y, w = inputs
    logits = jnp.dot(x, kernel, preferred_element_type=jnp.float32) + bias
    shift = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - shift)
    total = jnp.sum(exp, axis=-1)
    target_logits = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    loss = jnp.sum(w * (jnp.log(total) + shift[:, 0] - target_logits))
    d_logits = (exp * (w / total)[:, None]).at[jnp.arange(rows), y].add(-w)
    # Contracting the kernel's vocabulary axis in place: no transposed copy.
    d_x = jax.lax.dot_general(d_logits.astype(x.dtype), kernel, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    d_kernel = d_kernel + jnp.dot(x.T, d_logits.astype(x.dtype),
                                  preferred_element_type=jnp.float32)
    return (d_kernel, d_bias + jnp.sum(d_logits, axis=0)), (loss, d_x.astype(x.dtype))

  zeros = (jnp.zeros(kernel.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32))
  (d_kernel, d_bias), (losses, d_features) = jax.lax.scan(
      chunk, zeros, (chunked(features.reshape(steps * batch, hidden)),
                     chunked(targets.reshape(-1)), chunked(weights.reshape(-1))))
  grads = (d_features.reshape(features.shape), d_kernel.astype(kernel.dtype),
           d_bias.astype(bias.dtype))
  return jnp.sum(losses), grads


def _weighted_nll_sum_bwd(steps_per_chunk, grads, cotangent):
  del steps_per_chunk
  d_features, d_kernel, d_bias = (g * cotangent.astype(g.dtype) for g in grads)
  return d_features, d_kernel, d_bias, None, None


weighted_nll_sum.defvjp(_weighted_nll_sum_fwd, _weighted_nll_sum_bwd)


def _gates(pre: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  i, f, g, o = jnp.split(pre, 4, axis=-1)
  return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lstm_recurrence(projected: jax.Array, w_rec: jax.Array, carry: Carry,
                    compute_dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, Carry]:
  """The sequential part of an LSTM layer over ``projected [T, B, 4H]``.

  ``projected`` is the input projection plus biases for every step; each step
  adds ``h @ w_rec`` and applies the gates (PyTorch order i, f, g, o).
  Returns ``(h for every step [T, B, H], (h, c) after the last step)``.

  Its gradient is hand-written: the backward loop only propagates ``dh`` and
  ``dc`` through time, and the recurrent kernel's gradient is one
  ``[H, T*B] @ [T*B, 4H]`` product afterwards instead of ``T`` rank-``B``
  updates accumulated inside the loop. Both loops are unrolled (``T`` is a
  few dozen), which removes XLA:CPU's per-iteration overhead.
  """
  outputs, carry, _ = _lstm_forward(projected, w_rec, carry, compute_dtype)
  return outputs, carry


def _lstm_forward(projected, w_rec, carry, compute_dtype):
  w = w_rec.astype(compute_dtype)

  def step(carry, x_t):
    h, c = carry
    i, f, g, o = _gates(x_t + jnp.dot(h.astype(compute_dtype), w,
                                      preferred_element_type=jnp.float32))
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return (h, c), (h, c, jnp.concatenate([i, f, g, o], axis=-1))

  carry, (hs, cs, gates) = jax.lax.scan(step, carry, projected, unroll=projected.shape[0])
  return hs, carry, (cs, gates)


def _lstm_recurrence_fwd(projected, w_rec, carry, compute_dtype):
  hs, last, (cs, gates) = _lstm_forward(projected, w_rec, carry, compute_dtype)
  h0, c0 = carry
  previous_h = jnp.concatenate([h0[None], hs[:-1]])
  previous_c = jnp.concatenate([c0[None], cs[:-1]])
  return (hs, last), (w_rec, previous_h, previous_c, cs, gates)


def _lstm_recurrence_bwd(compute_dtype, residuals, cotangents):
  w_rec, previous_h, previous_c, cs, gates = residuals
  d_hs, (d_h_last, d_c_last) = cotangents
  w_t = w_rec.T.astype(compute_dtype)

  def step(carry, inputs):
    d_h_next, d_c_next = carry
    d_h_out, c_prev, c, gate = inputs
    i, f, g, o = jnp.split(gate, 4, axis=-1)
    d_h = d_h_out + d_h_next
    tanh_c = jnp.tanh(c)
    d_c = d_c_next + d_h * o * (1 - tanh_c * tanh_c)
    d_pre = jnp.concatenate([d_c * g * i * (1 - i), d_c * c_prev * f * (1 - f),
                             d_c * i * (1 - g * g), d_h * tanh_c * o * (1 - o)], axis=-1)
    d_h_prev = jnp.dot(d_pre.astype(compute_dtype), w_t, preferred_element_type=jnp.float32)
    return (d_h_prev, d_c * f), d_pre

  (d_h0, d_c0), d_projected = jax.lax.scan(
      step, (d_h_last, d_c_last), (d_hs, previous_c, cs, gates), reverse=True,
      unroll=d_hs.shape[0])
  rows = d_hs.shape[0] * d_hs.shape[1]
  d_w_rec = jnp.dot(previous_h.reshape(rows, -1).T.astype(compute_dtype),
                    d_projected.reshape(rows, -1).astype(compute_dtype),
                    preferred_element_type=jnp.float32)
  return d_projected, d_w_rec.astype(w_rec.dtype), (d_h0, d_c0)


lstm_recurrence.defvjp(_lstm_recurrence_fwd, _lstm_recurrence_bwd)


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
    return lstm_recurrence(projected, w_rec, carry, dtype)


class StackedLSTMLM(nn.Module):
  """Embedding -> dropout -> N LSTM layers (dropout between) -> dropout -> decoder."""
  vocab_size: int
  emsize: int
  nhid: int
  nlayers: int
  dropout: float = 0.0
  tied: bool = False
  compute_dtype: jnp.dtype = jnp.float32
  # Rows (batch x time steps) per chunk of the fused loss gradient; 0 = plain autodiff.
  loss_chunk_rows: int = 128

  def initial_carry(self, batch_size: int) -> tuple[Carry, ...]:
    # Separate buffers, so a jitted step can donate the carry.
    zeros = lambda: jnp.zeros((batch_size, self.nhid), jnp.float32)
    return tuple((zeros(), zeros()) for _ in range(self.nlayers))

  @nn.compact
  def __call__(self, tokens: jax.Array, carry: Sequence[Carry], *, train: bool,
               targets: jax.Array | None = None,
               weights: jax.Array | None = None) -> tuple[jax.Array, tuple[Carry, ...]]:
    """Runs ``tokens [B, T]`` from ``carry``.

    Returns:
      ``(logits [B, T, vocab], carry)``; with ``targets [B, T]`` the per-token
      negative log-likelihood ``[B, T]`` instead of the logits (cheaper to
      differentiate, see :func:`softmax_nll`); with ``targets`` and
      ``weights [B, T]`` the scalar ``sum(weights * nll)``, whose gradient is
      fused into chunks of ``loss_chunk_rows`` rows (see :func:`weighted_nll_sum`).
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
    steps, batch = x.shape[:2]
    if targets is not None and weights is not None:
      weights = weights.T.astype(jnp.float32)
      if self.loss_chunk_rows > 0:
        loss = weighted_nll_sum(x, kernel, bias, targets.T, weights,
                                chunk_steps(steps, batch, self.loss_chunk_rows))
      else:
        loss = _plain_weighted_nll_sum(x, kernel, bias, targets.T, weights)
      return loss, tuple(new_carry)
    if targets is not None:
      nll = softmax_nll(x.reshape(steps * batch, -1), kernel, bias, targets.T.reshape(-1))
      return nll.reshape(steps, batch).T, tuple(new_carry)
    logits = jnp.dot(x, kernel, preferred_element_type=jnp.float32) + bias
    return jnp.swapaxes(logits, 0, 1), tuple(new_carry)
