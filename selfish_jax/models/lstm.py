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

from selfish_jax.models import layers
from selfish_jax.checks import check_int
from selfish_jax.models.family import Family, check_tied_square
from selfish_jax.models.layers import GateBlocks, uniform_init
from selfish_jax.models.softmax import SoftmaxHead

Carry = tuple[jax.Array, jax.Array]  # (h, c), each [batch, hidden]

LSTM_GATES = ('i', 'f', 'g', 'o')
INPUT_KERNEL = 'input_kernel'
RECURRENT_KERNEL = 'recurrent_kernel'


def _gate_activations(pre: jax.Array) -> jax.Array:
  """The four gates of ``pre [..., 4H]`` in place: sigmoid for i, f, o and tanh for g.

  ``sigmoid(x) = tanh(x / 2) / 2 + 1 / 2``, so one tanh with per-column scales
  covers all four blocks: XLA:CPU then runs one fused loop per time step
  instead of one per gate.
  """
  hidden = pre.shape[-1] // 4
  column = jax.lax.broadcasted_iota(jnp.int32, (pre.shape[-1],), 0)
  is_cell = (column >= 2 * hidden) & (column < 3 * hidden)
  scale = jnp.where(is_cell, 1.0, 0.5).astype(pre.dtype)
  shift = jnp.where(is_cell, 0.0, 0.5).astype(pre.dtype)
  return jnp.tanh(pre * scale) * scale + shift


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lstm_recurrence(projected: jax.Array, w_rec: jax.Array, carry: Carry,
                    valid: jax.Array | None = None, compute_dtype: jnp.dtype = jnp.float32,
                    unroll: int = 1) -> tuple[jax.Array, Carry]:
  """The sequential part of an LSTM layer over ``projected [T, B, 4H]``.

  ``projected`` is the input projection plus biases for every step; each step
  adds ``h @ w_rec`` and applies the gates (PyTorch order i, f, g, o). Where
  ``valid [T, B, 1]`` is False (padding) the state is held unchanged.
  Returns ``(h for every step [T, B, H], (h, c) after the last step)``.

  Its gradient is hand-written: the backward loop only propagates ``dh`` and
  ``dc`` through time, and the recurrent kernel's gradient is one
  ``[H, T*B] @ [T*B, 4H]`` product afterwards instead of ``T`` rank-``B``
  updates accumulated inside the loop (contracting time and batch in place, so
  a batch sharded over devices is never gathered).

  ``unroll`` is the time steps per loop iteration of both loops. On the CPU, 1
  compiles fastest and runs as fast as 2 or 5; full unrolling is slower to run
  and much slower to compile (RESULTS.md, Speed). On an accelerator, measure
  (``benchmarks.step --config.lstm_unroll=N`` reports both).
  """
  outputs, carry, _ = _lstm_forward(projected, w_rec, carry, valid, compute_dtype, unroll)
  return outputs, carry


def _lstm_forward(projected, w_rec, carry, valid, compute_dtype, unroll):
  w = w_rec.astype(compute_dtype)

  def step(carry, inputs):
    x_t, valid_t = inputs
    h_prev, c_prev = carry
    gates = _gate_activations(x_t + jnp.dot(h_prev.astype(compute_dtype), w,
                                            preferred_element_type=jnp.float32))
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = layers.hold_on_padding(valid_t, f * c_prev + i * g, c_prev)
    h = layers.hold_on_padding(valid_t, o * jnp.tanh(c), h_prev)
    return (h, c), (h, c, gates)

  carry, (hs, cs, gates) = jax.lax.scan(step, carry, (projected, valid), unroll=unroll)
  return hs, carry, (cs, gates)


def _lstm_recurrence_fwd(projected, w_rec, carry, valid, compute_dtype, unroll):
  hs, last, (cs, gates) = _lstm_forward(projected, w_rec, carry, valid, compute_dtype, unroll)
  h0, c0 = carry
  previous_h = jnp.concatenate([h0[None], hs[:-1]])
  previous_c = jnp.concatenate([c0[None], cs[:-1]])
  return (hs, last), (w_rec, previous_h, previous_c, cs, gates, valid)


_TRANSPOSE_BELOW = 1 << 20  # entries of w_rec below which the backward loop reads a transposed copy


def _lstm_recurrence_bwd(compute_dtype, unroll, residuals, cotangents):
  w_rec, previous_h, previous_c, cs, gates, valid = residuals
  d_hs, (d_h_last, d_c_last) = cotangents
  # d_h_prev = d_pre @ w_rec.T each step. A small w_rec is transposed once
  # (faster than contracting it in place); a large one is contracted in place,
  # as its transposed copy costs more (RESULTS.md, Speed).
  transposed = w_rec.size < _TRANSPOSE_BELOW
  w = (w_rec.T if transposed else w_rec).astype(compute_dtype)
  # Every factor that does not depend on the cotangents flowing back through
  # time is computed for all steps at once, outside the sequential loop: on
  # the CPU one large elementwise pass costs far less than T small ones.
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  tanh_c = jnp.tanh(cs)
  c_per_h = o * (1 - tanh_c * tanh_c)  # d c / d h through h = o * tanh(c)
  # d pre = [d_c, d_c, d_c, d_h] * pre_per_ch, blocks i, f, g, o.
  pre_per_ch = jnp.concatenate([g * i * (1 - i), previous_c * f * (1 - f), i * (1 - g * g),
                                tanh_c * o * (1 - o)], axis=-1)
  if valid is not None:  # a held step passes its cotangents straight through
    pre_per_ch = jnp.where(valid, pre_per_ch, 0.0)

  def step(carry, inputs):
    d_h_next, d_c_next = carry
    d_h_out, c_per_h_t, pre_per_ch_t, f_t, valid_t = inputs
    d_h = d_h_out + d_h_next
    d_c = d_c_next + d_h * c_per_h_t
    d_pre = jnp.concatenate([d_c, d_c, d_c, d_h], axis=-1) * pre_per_ch_t
    d_h_prev = jnp.einsum('bg,gh->bh' if transposed else 'bg,hg->bh',
                          d_pre.astype(compute_dtype), w, preferred_element_type=jnp.float32)
    d_c_prev = d_c * f_t
    if valid_t is not None:
      d_h_prev = jnp.where(valid_t, d_h_prev, d_h)
      d_c_prev = jnp.where(valid_t, d_c_prev, d_c_next)
    return (d_h_prev, d_c_prev), d_pre

  (d_h0, d_c0), d_projected = jax.lax.scan(
      step, (d_h_last, d_c_last), (d_hs, c_per_h, pre_per_ch, f, valid), reverse=True,
      unroll=unroll)
  # Contracting time and batch in place (no [T*B, .] reshape): a batch split
  # over devices stays split, and XLA all-reduces the partial products.
  d_w_rec = jnp.einsum('tbh,tbg->hg', previous_h.astype(compute_dtype),
                       d_projected.astype(compute_dtype), preferred_element_type=jnp.float32)
  return d_projected, d_w_rec.astype(w_rec.dtype), (d_h0, d_c0), None


lstm_recurrence.defvjp(_lstm_recurrence_fwd, _lstm_recurrence_bwd)


def lstm_gate_layout(names: tuple[str, ...], shape: tuple[int, ...]) -> GateBlocks | None:
  """The four gates of an :class:`LSTMLayer` kernel, None for any other leaf."""
  if names[-1] in (INPUT_KERNEL, RECURRENT_KERNEL):
    return layers.equal_gates(LSTM_GATES, shape[-1])
  return None


class LSTMLayer(nn.Module):
  """One LSTM layer over a time-major window ``[T, B, in]``.

  ``weight_drop`` is DropConnect on the recurrent kernel, one mask per window
  (AWD-LSTM); the state is held through padded steps (``valid [T, B, 1]``).
  """
  hidden_size: int
  compute_dtype: jnp.dtype = jnp.float32
  weight_drop: float = 0.0
  unroll: int = 1  # time steps per iteration of the recurrence's loops

  @nn.compact
  def __call__(self, inputs: jax.Array, carry: Carry, valid: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, Carry]:
    hidden = self.hidden_size
    init = uniform_init(1.0 / math.sqrt(hidden))
    w_in = self.param(INPUT_KERNEL, init, (inputs.shape[-1], 4 * hidden))
    w_rec = self.param(RECURRENT_KERNEL, init, (hidden, 4 * hidden))
    b_in = self.param('input_bias', init, (4 * hidden,))
    b_rec = self.param('recurrent_bias', init, (4 * hidden,))
    w_rec = layers.drop_connect(self, w_rec, self.weight_drop, train)
    dtype = self.compute_dtype
    # The input projection of the whole window is one large matmul; only the
    # recurrent product stays inside the sequential loop.
    projected = layers.project(inputs, w_in, dtype) + (b_in + b_rec)
    return lstm_recurrence(projected, w_rec, carry, valid, dtype, self.unroll)


def zero_carry(batch_size: int, hidden_sizes: Sequence[int]) -> tuple[Carry, ...]:
  """``(h, c)`` zeros per layer, separate buffers so a jitted step can donate the carry."""
  return tuple((jnp.zeros((batch_size, h), jnp.float32), jnp.zeros((batch_size, h), jnp.float32))
               for h in hidden_sizes)


class StackedLSTMLM(nn.Module):
  """Embedding -> dropout -> N LSTM layers (dropout between) -> dropout -> decoder.

  The Selfish-RNN stacked LSTM (``config.model = 'lstm'``): PyTorch's
  ``word_language_model`` with element-wise dropout ``dropout`` everywhere.
  """
  vocab_size: int
  emsize: int
  nhid: int
  nlayers: int
  dropout: float = 0.0
  tied: bool = False
  compute_dtype: jnp.dtype = jnp.float32
  # Rows (batch x time steps) per chunk of the fused loss gradient; 0 = plain autodiff.
  loss_chunk_rows: int = 128
  unroll: int = 1  # time steps per iteration of the recurrences' loops

  def initial_carry(self, batch_size: int) -> tuple[Carry, ...]:
    return zero_carry(batch_size, [self.nhid] * self.nlayers)

  def gate_layout(self, names: tuple[str, ...], shape: tuple[int, ...]) -> GateBlocks | None:
    return lstm_gate_layout(names, shape)

  def weight_uses(self, names: tuple[str, ...]) -> int:
    return layers.tied_embedding_uses(names, self.tied)

  @nn.compact
  def __call__(self, tokens: jax.Array, carry: Sequence[Carry], *, train: bool,
               weights: jax.Array | None = None) -> tuple[SoftmaxHead, tuple[Carry, ...]]:
    """The :class:`~selfish_jax.models.interface.LanguageModel` forward pass."""
    if self.tied and self.emsize != self.nhid:
      raise ValueError('tied weights need emsize == nhid')
    drop = nn.Dropout(self.dropout, deterministic=not train)
    valid = layers.time_valid(weights)
    embedding = self.param('embedding', uniform_init(0.1), (self.vocab_size, self.emsize))
    x = drop(jnp.take(embedding, tokens.T, axis=0))  # time-major [T, B, E] for the scans
    new_carry = []
    for layer in range(self.nlayers):
      x, layer_carry = LSTMLayer(self.nhid, self.compute_dtype, unroll=self.unroll,
                                 name=f'lstm_{layer}')(
          x, carry[layer], valid)
      new_carry.append(layer_carry)
      x = drop(x)  # between layers and, after the last, on the output
    kernel, bias = layers.decoder_params(self, embedding, self.tied, self.nhid, uniform_init(0.1))
    dtype = self.compute_dtype
    head = SoftmaxHead(x.astype(dtype), kernel.astype(dtype), bias, self.loss_chunk_rows)
    return head, tuple(new_carry)


# Time steps per iteration of the LSTM recurrence's loops (see lstm_recurrence).
UNROLL_KEY = {'lstm_unroll': 1}


def _check(values) -> None:
  check_tied_square(values)
  check_int(values, 'lstm_unroll')


FAMILY = Family(
    'lstm', UNROLL_KEY,
    lambda values, vocab_size, common: StackedLSTMLM(
        vocab_size=vocab_size, nlayers=values['nlayers'], unroll=values['lstm_unroll'], **common),
    _check)
