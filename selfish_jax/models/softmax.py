"""The softmax output of a language model and its fused, chunked gradient."""

from __future__ import annotations

import functools

import flax.struct

import jax
import jax.numpy as jnp


def softmax_nll(features: jax.Array, kernel: jax.Array, bias: jax.Array,
                targets: jax.Array) -> jax.Array:
  """Per-token ``-log softmax(features @ kernel + bias)[target]`` of ``features
  [..., H]`` and ``targets [...]`` (any leading axes, kept as they are).

  The target logit is computed from the gathered kernel columns rather than
  picked out of the ``[N, vocab]`` logits: differentiating a pick scatters
  into a dense ``[N, vocab]`` buffer, which costs XLA:CPU about as much as a
  decoder matmul. The max shift is constant to autodiff (it cancels exactly).
  """
  logits = jnp.dot(features, kernel, preferred_element_type=jnp.float32) + bias
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  log_normaliser = jnp.log(jnp.sum(jnp.exp(logits - shift), axis=-1)) + shift[..., 0]
  target_columns = jnp.take(kernel, targets, axis=1)  # [H, ...]
  target_logits = jnp.einsum('...h,h...->...', features.astype(jnp.float32),
                             target_columns.astype(jnp.float32)) + bias[targets]
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
def chunked_softmax_nll_sum(features: jax.Array, kernel: jax.Array, bias: jax.Array,
                            targets: jax.Array, weights: jax.Array, steps_per_chunk: int
                            ) -> jax.Array:
  """``sum(weights * softmax_nll(...))`` over time-major ``features [T, B, H]``.

  Its gradient is computed during the forward pass, ``steps_per_chunk`` time
  steps at a time (the fused softmax cross-entropy of large-vocabulary LMs):
  each ``[rows, vocab]`` tile of logits, probabilities and their gradient stays
  in cache instead of streaming ``[T*B, vocab]`` buffers through memory six or
  more times, which is what bounds the 10,000-way softmax on a CPU. Chunks are
  whole time steps with the batch kept as its own axis, so a batch sharded
  over devices stays sharded and nothing is gathered.
  ``weights`` get no gradient.
  """
  return _plain_weighted_nll_sum(features, kernel, bias, targets, weights)


def _plain_weighted_nll_sum(features, kernel, bias, targets, weights):
  """``sum(weights * nll)`` over time-major ``[T, B]`` tokens, differentiated by autodiff."""
  return jnp.sum(weights * softmax_nll(features, kernel, bias, targets))


def _chunked_softmax_nll_sum_fwd(features, kernel, bias, targets, weights, steps_per_chunk):
  steps = targets.shape[0]
  if steps % steps_per_chunk:
    raise ValueError(f'{steps_per_chunk} steps per chunk do not divide {steps} steps')
  num_chunks = steps // steps_per_chunk
  chunked = lambda a: a.reshape(num_chunks, steps_per_chunk, *a.shape[1:])  # a: [T, B, ...]

  def chunk(carry, inputs):
    d_kernel, d_bias = carry
    x, y, w = inputs  # [S, B, H], [S, B], [S, B]
    logits = jnp.einsum('sbh,hv->sbv', x, kernel, preferred_element_type=jnp.float32) + bias
    shift = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - shift)
    total = jnp.sum(exp, axis=-1)
    target_logits = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    loss = jnp.sum(w * (jnp.log(total) + shift[..., 0] - target_logits))
    # The target's -w as an element-wise select (fused with the line before),
    # not a scatter, which XLA would gather over a sharded batch.
    is_target = jnp.arange(kernel.shape[1]) == y[..., None]
    d_logits = exp * (w / total)[..., None] - jnp.where(is_target, w[..., None], 0.0)
    # Contracting the kernel's vocabulary axis in place: no transposed copy.
    d_x = jnp.einsum('sbv,hv->sbh', d_logits.astype(x.dtype), kernel,
                     preferred_element_type=jnp.float32)
    d_kernel = d_kernel + jnp.einsum('sbh,sbv->hv', x, d_logits.astype(x.dtype),
                                     preferred_element_type=jnp.float32)
    return (d_kernel, d_bias + jnp.sum(d_logits, axis=(0, 1))), (loss, d_x.astype(x.dtype))

  zeros = (jnp.zeros(kernel.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32))
  (d_kernel, d_bias), (losses, d_features) = jax.lax.scan(
      chunk, zeros, (chunked(features), chunked(targets), chunked(weights)))
  grads = (d_features.reshape(features.shape), d_kernel.astype(kernel.dtype),
           d_bias.astype(bias.dtype))
  return jnp.sum(losses), grads


def _chunked_softmax_nll_sum_bwd(steps_per_chunk, grads, cotangent):
  del steps_per_chunk
  d_features, d_kernel, d_bias = (g * cotangent.astype(g.dtype) for g in grads)
  return d_features, d_kernel, d_bias, None, None


chunked_softmax_nll_sum.defvjp(_chunked_softmax_nll_sum_fwd, _chunked_softmax_nll_sum_bwd)


@flax.struct.dataclass
class SoftmaxHead:
  """A softmax output layer's inputs, what a family's forward pass returns:
  time-major ``features [T, B, H]``, the decoder ``kernel [H, vocab]`` and
  ``bias [vocab]``. Its methods are the entry points' outputs (an
  :class:`~selfish_jax.models.interface.OutputHead`)."""
  features: jax.Array
  kernel: jax.Array
  bias: jax.Array
  # Rows (batch x time steps) per chunk of the fused loss gradient; 0 = plain autodiff.
  loss_chunk_rows: int = flax.struct.field(pytree_node=False, default=0)

  def logits(self) -> jax.Array:
    """``[B, T, vocab]``."""
    logits = jnp.dot(self.features, self.kernel, preferred_element_type=jnp.float32) + self.bias
    return jnp.swapaxes(logits, 0, 1)

  def token_nll(self, targets: jax.Array) -> jax.Array:
    """The NLL ``[B, T]`` of ``targets [B, T]`` (see :func:`softmax_nll`)."""
    return softmax_nll(self.features, self.kernel, self.bias, targets.T).T

  def weighted_nll_sum(self, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum(weights * nll)`` over ``[B, T]``, its gradient fused into chunks of
    ``loss_chunk_rows`` rows (see :func:`chunked_softmax_nll_sum`)."""
    steps, batch = self.features.shape[:2]
    weights = weights.T.astype(jnp.float32)
    if self.loss_chunk_rows > 0:
      return chunked_softmax_nll_sum(self.features, self.kernel, self.bias, targets.T, weights,
                                     chunk_steps(steps, batch, self.loss_chunk_rows))
    return _plain_weighted_nll_sum(self.features, self.kernel, self.bias, targets.T, weights)
