"""AWD-LSTM with a Mixture of Softmaxes (Yang et al., 2018): ``config.model = 'awd_lstm_mos'``.

Three LSTM layers (``emsize -> nhid -> nhid -> nhid_last``) with DropConnect
on the recurrent kernels, then ``n_experts`` softmaxes over the vocabulary
mixed by a learned prior::

  latent_k = tanh(h W_latent + b)[k]          (one emsize-vector per expert)
  p(y) = sum_k softmax(h W_prior)_k softmax(latent_k E^T + b_dec)_y

with the decoder tied to the embedding ``E``. The LSTM layers are
:class:`~selfish_jax.models.lstm.LSTMLayer` (fused gates, hand-written
gradient); the latent and prior matrices are maskable like every other matrix.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from selfish_jax.models import layers
from selfish_jax.checks import check_fractions, check_int
from selfish_jax.models.family import Family, pick
from selfish_jax.models.layers import GateBlocks, linear_init, uniform_init
from selfish_jax.models.lstm import UNROLL_KEY, Carry, LSTMLayer, lstm_gate_layout, zero_carry
from selfish_jax.models.softmax import chunk_steps


def mixture_log_probs(latent: jax.Array, prior_logits: jax.Array, kernel: jax.Array,
                      bias: jax.Array) -> jax.Array:
  """``log p`` ``[..., vocab]`` of the mixture, from ``latent [..., K, E]`` and
  ``prior_logits [..., K]`` (any leading axes, kept); computed in log space (the official code adds
  1e-8 to ``p`` before the log, a difference far below float32 noise for
  any token of non-negligible probability)."""
  logits = jnp.einsum('...ke,ev->...kv', latent, kernel,
                      preferred_element_type=jnp.float32) + bias
  log_experts = jax.nn.log_softmax(logits, axis=-1)
  log_prior = jax.nn.log_softmax(prior_logits.astype(jnp.float32), axis=-1)
  return jax.nn.logsumexp(log_experts + log_prior[..., None], axis=-2)


def mixture_nll(latent: jax.Array, prior_logits: jax.Array, kernel: jax.Array, bias: jax.Array,
                targets: jax.Array, steps_per_chunk: int) -> jax.Array:
  """Per-token NLL ``[T, B]`` of time-major ``latent [T, B, K, E]``, ``steps_per_chunk``
  time steps at a time, each chunk rematerialised in the backward pass: the
  ``[steps, B, K, vocab]`` expert probabilities are never all in memory at
  once. Chunks keep the batch as its own axis, so a sharded batch stays split."""
  steps = targets.shape[0]
  split = lambda a: a.reshape(steps // steps_per_chunk, steps_per_chunk, *a.shape[1:])

  @jax.checkpoint
  def chunk(inputs):
    lat, prior, y = inputs
    log_p = mixture_log_probs(lat, prior, kernel, bias)
    return -jnp.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]

  nll = jax.lax.map(chunk, (split(latent), split(prior_logits), split(targets)))
  return nll.reshape(targets.shape)


@flax.struct.dataclass
class MixtureHead:
  """The mixture of softmaxes' inputs (an
  :class:`~selfish_jax.models.interface.OutputHead`): time-major
  ``latent [T, B, K, E]`` and ``prior_logits [T, B, K]``, the decoder
  ``kernel [E, vocab]`` and ``bias``."""
  latent: jax.Array
  prior_logits: jax.Array
  kernel: jax.Array
  bias: jax.Array
  loss_chunk_rows: int = flax.struct.field(pytree_node=False, default=0)

  def logits(self) -> jax.Array:
    """The mixture's log-probabilities ``[B, T, vocab]``."""
    return jnp.swapaxes(mixture_log_probs(self.latent, self.prior_logits, self.kernel,
                                          self.bias), 0, 1)

  def _time_major_nll(self, targets: jax.Array) -> jax.Array:
    steps, batch = self.latent.shape[:2]
    return mixture_nll(self.latent, self.prior_logits, self.kernel, self.bias, targets.T,
                       chunk_steps(steps, batch, self.loss_chunk_rows))

  def token_nll(self, targets: jax.Array) -> jax.Array:
    return self._time_major_nll(targets).T

  def weighted_nll_sum(self, targets: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(weights.T * self._time_major_nll(targets))


class AWDLSTMMoSLM(nn.Module):
  """Embedding -> 3 weight-dropped LSTM layers -> mixture of softmaxes."""
  vocab_size: int
  emsize: int
  nhid: int
  nhid_last: int
  nlayers: int = 3
  n_experts: int = 15
  tied: bool = True
  dropout: float = 0.0  # locked, on the last layer's output
  dropout_input: float = 0.0  # locked, on the embedded input
  dropout_hidden: float = 0.0  # locked, between layers
  dropout_embedding: float = 0.0  # whole words
  dropout_latent: float = 0.0  # locked, on the experts' latent vectors
  weight_drop: float = 0.0  # DropConnect on the recurrent kernels
  ar_alpha: float = 0.0
  tar_beta: float = 0.0
  compute_dtype: jnp.dtype = jnp.float32
  loss_chunk_rows: int = 128
  unroll: int = 1  # time steps per iteration of the LSTM layers' loops

  @property
  def hidden_sizes(self) -> Sequence[int]:
    return [self.nhid] * (self.nlayers - 1) + [self.nhid_last]

  def initial_carry(self, batch_size: int) -> tuple[Carry, ...]:
    return zero_carry(batch_size, self.hidden_sizes)

  def gate_layout(self, names: tuple[str, ...], shape: tuple[int, ...]) -> GateBlocks | None:
    return lstm_gate_layout(names, shape)

  def weight_uses(self, names: tuple[str, ...]) -> int:
    if names[-1] == 'embedding':  # a lookup, and the decoder of every expert when tied
      return self.n_experts if self.tied else 0
    if names[-1] == 'decoder_kernel':
      return self.n_experts
    return 1

  @nn.compact
  def __call__(self, tokens: jax.Array, carry: Sequence[Carry], *, train: bool,
               weights: jax.Array | None = None) -> tuple[MixtureHead, tuple[Carry, ...]]:
    """The :class:`~selfish_jax.models.interface.LanguageModel` forward pass; in
    training the AR/TAR penalties are sown into ``'penalties'``."""
    dtype = self.compute_dtype
    valid = layers.time_valid(weights)
    embedding = self.param('embedding', uniform_init(0.1), (self.vocab_size, self.emsize))
    x = layers.embedded_words(self, embedding, tokens, self.dropout_embedding, self.dropout_input,
                              train)
    cells = [LSTMLayer(hidden, dtype, self.weight_drop, self.unroll, name=f'lstm_{layer}')
             for layer, hidden in enumerate(self.hidden_sizes)]
    x, new_carry = layers.awd_stack(self, cells, x, carry, valid, train,
                                    dropout_hidden=self.dropout_hidden, dropout=self.dropout,
                                    ar_alpha=self.ar_alpha, tar_beta=self.tar_beta)
    steps, batch = x.shape[:2]
    latent_width = self.n_experts * self.emsize
    w_latent = self.param('latent_kernel', linear_init(self.nhid_last),
                          (self.nhid_last, latent_width))
    b_latent = self.param('latent_bias', linear_init(self.nhid_last), (latent_width,))
    w_prior = self.param('prior_kernel', linear_init(self.nhid_last),
                         (self.nhid_last, self.n_experts))
    latent = jnp.tanh(jnp.dot(x.astype(dtype), w_latent.astype(dtype),
                              preferred_element_type=jnp.float32) + b_latent)
    latent = layers.locked_dropout(self, latent, self.dropout_latent, train)
    latent = latent.reshape(steps, batch, self.n_experts, self.emsize).astype(dtype)
    prior_logits = jnp.dot(x.astype(dtype), w_prior.astype(dtype),
                           preferred_element_type=jnp.float32)
    kernel, bias = layers.decoder_params(self, embedding, self.tied, self.emsize, uniform_init(0.1))
    return MixtureHead(latent, prior_logits, kernel.astype(dtype), bias,
                       self.loss_chunk_rows), new_carry


def _check(values) -> None:
  check_int(values, 'lstm_unroll')
  check_int(values, 'n_experts')
  check_int(values, 'nhid_last', minimum=0)
  check_fractions(values, ('dropout_latent',))
  layers.check_awd_regularisers(values)


FAMILY = Family('awd_lstm_mos', {
    'nhid_last': 0,  # the last LSTM layer's size (0: emsize)
    'n_experts': 15,  # softmaxes in the mixture
    'dropout_latent': 0.0,  # locked, on the experts' latent vectors
    **layers.AWD_REGULARISERS, **UNROLL_KEY,
}, lambda values, vocab_size, common: AWDLSTMMoSLM(
    vocab_size=vocab_size, nlayers=values['nlayers'],
    nhid_last=values['nhid_last'] or values['emsize'], n_experts=values['n_experts'],
    dropout_latent=values['dropout_latent'], unroll=values['lstm_unroll'],
    **pick(values, layers.AWD_REGULARISERS), **common), _check)
