"""Recurrent Highway Network language model (Zilly et al., 2017).

One recurrent layer of ``depth`` highway micro-steps per token, with a coupled
carry gate (``c = 1 - t``)::

  s_0 = s_{t-1}
  [h_l, t_l] = [tanh, sigmoid](x_t W [l == 0] + (s_{l-1} * m) R_l + b_l)
  s_l = h_l * t_l + s_{l-1} * (1 - t_l)

Each micro-step's two gates share one fused kernel ``R_l [H, 2H]`` (and the
first also ``W [E, 2H]``), so one mask per matrix makes h and t compete for
one budget. ``m`` is one hidden-state dropout mask per sequence, reused at
every depth and time step. Zilly's regularisation: word-level embedding
dropout, locked input and output dropout, weights tied.

Two initialisations (``init_scheme``):

* ``'selfish_rnn'``, the official Selfish-RNN ``models.py`` (``HighwayBlock``):
  ``W`` and every ``R_l`` are PyTorch ``nn.Linear`` layers, kernel and bias
  U(+-1/sqrt(fan_in)), so the depth-0 pre-activation has two biases (``W``'s,
  ``input_bias``, and ``R_0``'s, ``bias_0``); the embedding is U(+-0.1), an
  untied decoder U(+-0.1) with bias 0. No negative transform-gate bias.
* ``'zilly'``, Zilly et al.'s TensorFlow recipe: every weight
  U(+-``init_scale``), one bias per depth, transform-gate biases
  ``transform_bias`` (negative: the highway starts by carrying).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfish_jax.errors import ConfigError
from selfish_jax.models import layers
from selfish_jax.checks import check_fractions, check_int
from selfish_jax.models.family import Family, check_tied_square, pick
from selfish_jax.models.layers import GateBlocks, linear_init, uniform_init
from selfish_jax.models.softmax import SoftmaxHead

RHN_GATES = ('h', 't')
RHN_INITS = ('selfish_rnn', 'zilly')
ZILLY_TRANSFORM_BIAS = -2.0  # Zilly et al.'s initial transform-gate bias
ZILLY_INIT_SCALE = 0.04  # and their U(-s, s) weights
INPUT_KERNEL = 'input_kernel'
RECURRENT_KERNEL = 'recurrent_kernel'  # + f'_{depth}'


class RHNLayer(nn.Module):
  """The highway recurrence over a time-major window ``[T, B, E]``; carry ``s [B, H]``."""
  hidden_size: int
  depth: int
  init_scheme: str = 'selfish_rnn'  # one of RHN_INITS
  transform_bias: float = ZILLY_TRANSFORM_BIAS  # 'zilly' only
  init_scale: float = ZILLY_INIT_SCALE  # 'zilly' only
  dropout_hidden: float = 0.0
  compute_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, carry: jax.Array, valid: jax.Array | None,
               train: bool) -> tuple[jax.Array, jax.Array]:
    hidden, dtype = self.hidden_size, self.compute_dtype
    fan_in = inputs.shape[-1]
    if self.init_scheme == 'selfish_rnn':
      input_init, recurrent_init = linear_init(fan_in), linear_init(hidden)
      bias_init = recurrent_init
    else:
      input_init = recurrent_init = uniform_init(self.init_scale)
      bias_init = lambda key, shape: jnp.concatenate(
          [jnp.zeros(shape[0] // 2), jnp.full(shape[0] // 2, self.transform_bias)])
    w_in = self.param(INPUT_KERNEL, input_init, (fan_in, 2 * hidden))
    kernels = [self.param(f'{RECURRENT_KERNEL}_{l}', recurrent_init,
                          (hidden, 2 * hidden)).astype(dtype) for l in range(self.depth)]
    biases = [self.param(f'bias_{l}', bias_init, (2 * hidden,)) for l in range(self.depth)]
    batch = inputs.shape[1]
    projected = layers.project(inputs, w_in, dtype)
    if self.init_scheme == 'selfish_rnn':  # nn.Linear W has a bias of its own
      projected = projected + self.param('input_bias', linear_init(fan_in), (2 * hidden,))
    if train and self.dropout_hidden > 0:
      keep = jax.random.bernoulli(self.make_rng('dropout'), 1 - self.dropout_hidden,
                                  (batch, hidden))
      hidden_mask = keep.astype(jnp.float32) / (1 - self.dropout_hidden)
    else:
      hidden_mask = None

    def step(s_prev, inputs_t):
      x_t, valid_t = inputs_t
      s = s_prev
      for l in range(self.depth):
        dropped = s if hidden_mask is None else s * hidden_mask
        pre = jnp.dot(dropped.astype(dtype), kernels[l],
                      preferred_element_type=jnp.float32) + biases[l]
        if l == 0:
          pre = pre + x_t
        h, t = jnp.split(pre, 2, axis=-1)
        t = jax.nn.sigmoid(t)
        s = jnp.tanh(h) * t + s * (1 - t)
      s = layers.hold_on_padding(valid_t, s, s_prev)
      return s, s

    carry, outputs = jax.lax.scan(step, carry, (projected, valid))
    return outputs, carry


class RHNLM(nn.Module):
  """Embedding -> RHN layer -> decoder (``config.model = 'rhn'``)."""
  vocab_size: int
  emsize: int
  nhid: int
  depth: int = 10
  tied: bool = True
  dropout: float = 0.0  # locked, on the output
  dropout_input: float = 0.0  # locked, on the embedded input
  dropout_hidden: float = 0.0  # on s, one mask for all depths and steps
  dropout_embedding: float = 0.0  # whole words
  init_scheme: str = 'selfish_rnn'  # one of RHN_INITS
  transform_bias: float = ZILLY_TRANSFORM_BIAS  # 'zilly' only
  init_scale: float = ZILLY_INIT_SCALE  # 'zilly' only
  compute_dtype: jnp.dtype = jnp.float32
  loss_chunk_rows: int = 128

  def initial_carry(self, batch_size: int) -> tuple[jax.Array]:
    return (jnp.zeros((batch_size, self.nhid), jnp.float32),)

  def gate_layout(self, names: tuple[str, ...], shape: tuple[int, ...]) -> GateBlocks | None:
    if names[-1] == INPUT_KERNEL or names[-1].startswith(RECURRENT_KERNEL):
      return layers.equal_gates(RHN_GATES, shape[-1])
    return None

  def weight_uses(self, names: tuple[str, ...]) -> int:
    return layers.tied_embedding_uses(names, self.tied)

  @nn.compact
  def __call__(self, tokens: jax.Array, carry: tuple[jax.Array], *, train: bool,
               weights: jax.Array | None = None) -> tuple[SoftmaxHead, tuple[jax.Array]]:
    """The :class:`~selfish_jax.models.interface.LanguageModel` forward pass."""
    if self.tied and self.emsize != self.nhid:
      raise ValueError('tied weights need emsize == nhid')
    valid = layers.time_valid(weights)
    scale = 0.1 if self.init_scheme == 'selfish_rnn' else self.init_scale
    embedding = self.param('embedding', uniform_init(scale), (self.vocab_size, self.emsize))
    x = layers.embedded_words(self, embedding, tokens, self.dropout_embedding, self.dropout_input,
                              train)
    x, s = RHNLayer(self.nhid, self.depth, self.init_scheme, self.transform_bias, self.init_scale,
                    self.dropout_hidden, self.compute_dtype, name='rhn')(x, carry[0], valid, train)
    x = layers.locked_dropout(self, x, self.dropout, train)
    kernel, bias = layers.decoder_params(self, embedding, self.tied, self.nhid,
                                         uniform_init(scale))
    dtype = self.compute_dtype
    head = SoftmaxHead(x.astype(dtype), kernel.astype(dtype), bias, self.loss_chunk_rows)
    return head, (s,)


def _check(values) -> None:
  check_tied_square(values)
  check_int(values, 'rhn_depth')
  check_fractions(values, ('dropout_input', 'dropout_hidden', 'dropout_embedding'))
  if values['nlayers'] != 1:
    raise ConfigError(f'model rhn has one recurrent layer (its depth is rhn_depth); '
                      f'nlayers must be 1, got {values["nlayers"]}')
  init = values['rhn_init']
  if init not in RHN_INITS:
    raise ConfigError(f'unknown rhn_init {init!r}; expected one of {RHN_INITS}')
  if init != 'zilly':
    for key in ('rhn_transform_bias', 'rhn_init_scale'):
      if values[key] != FAMILY.defaults[key]:
        raise ConfigError(f"{key} is read only with rhn_init='zilly', not {init!r}")


FAMILY = Family('rhn', {
    'rhn_depth': 10,  # highway micro-steps per token
    # selfish_rnn (the official Selfish-RNN models.py: PyTorch nn.Linear
    # defaults, embedding U(-0.1, 0.1)) | zilly (every weight U(-s, s) with
    # s = rhn_init_scale, transform-gate bias rhn_transform_bias)
    'rhn_init': 'selfish_rnn',
    'rhn_transform_bias': ZILLY_TRANSFORM_BIAS,  # rhn_init='zilly' only
    'rhn_init_scale': ZILLY_INIT_SCALE,  # rhn_init='zilly' only
    'dropout_input': 0.0,  # locked, on the embedded input
    'dropout_hidden': 0.0,  # on s at every depth
    'dropout_embedding': 0.0,  # whole words
}, lambda values, vocab_size, common: RHNLM(
    vocab_size=vocab_size, depth=values['rhn_depth'], init_scheme=values['rhn_init'],
    transform_bias=values['rhn_transform_bias'], init_scale=values['rhn_init_scale'],
    **pick(values, ('dropout_input', 'dropout_hidden', 'dropout_embedding')), **common), _check)
