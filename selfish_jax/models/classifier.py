"""A sparse LSTM document classifier (the text-classification task of the
Selfish-RNN journal paper): embedding -> LSTM layers -> the mean (or the last)
of the top layer's states over the real words -> linear layer over the classes. Its matrices (embedding, fused gate
kernels, classifier) are maskable like a language model's."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfish_jax.models import layers
from selfish_jax.models.layers import GateBlocks, uniform_init
from selfish_jax.models.lstm import LSTMLayer, lstm_gate_layout, zero_carry


class LSTMClassifier(nn.Module):
  vocab_size: int
  num_classes: int
  emsize: int
  nhid: int
  nlayers: int = 1
  dropout: float = 0.0
  pooling: str = 'mean'  # mean | last: how the top layer's states become one vector

  def gate_layout(self, names: tuple[str, ...], shape: tuple[int, ...]) -> GateBlocks | None:
    return lstm_gate_layout(names, shape)

  def weight_uses(self, names: tuple[str, ...]) -> int:
    return 0 if names[-1] == 'embedding' else 1

  @nn.compact
  def __call__(self, tokens: jax.Array, weights: jax.Array, *, train: bool) -> jax.Array:
    """``tokens, weights [B, T]`` (weights 1 on real words, padding after) -> logits ``[B, C]``.

    The recurrences hold their state through padding, so the final state is
    each document's state after its last real word; the mean pools the states
    of real words only. Mean pooling gives every step a direct gradient, which
    trains in a few epochs where the last state alone needs many.
    """
    drop = nn.Dropout(self.dropout, deterministic=not train)
    valid = layers.time_valid(weights)
    embedding = self.param('embedding', uniform_init(0.1), (self.vocab_size, self.emsize))
    x = drop(jnp.take(embedding, tokens.T, axis=0))
    carry = zero_carry(tokens.shape[0], [self.nhid] * self.nlayers)
    for layer in range(self.nlayers):
      x, (h, _) = LSTMLayer(self.nhid, name=f'lstm_{layer}')(x, carry[layer], valid, train)
    if self.pooling == 'mean':
      h = jnp.sum(x * weights.T[..., None], axis=0) / jnp.sum(weights, axis=1, keepdims=True)
    kernel = self.param('classifier_kernel', uniform_init(1 / math.sqrt(self.nhid)),
                        (self.nhid, self.num_classes))
    bias = self.param('classifier_bias', nn.initializers.zeros_init(), (self.num_classes,))
    return drop(h) @ kernel + bias
