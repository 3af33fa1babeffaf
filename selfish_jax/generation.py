"""Sampling text from a trained language model of any family."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from selfish_jax import models
from selfish_jax.models import LanguageModel

PyTree = Any


@functools.partial(jax.jit, static_argnames=('model', 'num_tokens'))
def sample(model: LanguageModel, params: PyTree, prompt: jax.Array, key: jax.Array, *,
           num_tokens: int, temperature: float | jax.Array = 1.0) -> jax.Array:
  """``num_tokens`` token ids continuing ``prompt [P]`` (at least one id).

  The prompt runs through the model from the zero state in one call; then
  each token is drawn from ``softmax(logits / temperature)`` and fed back.
  ``temperature == 0`` takes the most likely token (greedy).
  """
  carry = model.initial_carry(1)
  logits, carry = models.logits(model, params, prompt[None, :], carry)

  def step(state, step_key):
    last_logits, carry = state
    greedy = jnp.argmax(last_logits).astype(jnp.int32)
    drawn = jax.random.categorical(step_key, last_logits / jnp.maximum(temperature, 1e-6))
    token = jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)
    logits, carry = models.logits(model, params, token[None, None], carry)
    return (logits[0, -1], carry), token

  _, tokens = jax.lax.scan(step, (logits[0, -1], carry), jax.random.split(key, num_tokens))
  return tokens
