"""The stacked LSTM: fused gate layout, initialisation, loss path, padding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfish_jax.data import batching
from selfish_jax import models
from selfish_jax.models import lstm, softmax
from selfish_jax.training import language_model_steps as steps


def _model_and_params(**kwargs):
  model = lstm.StackedLSTMLM(vocab_size=50, emsize=8, nhid=12, nlayers=2, **kwargs)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32), model.initial_carry(1),
                      train=False)['params']
  return model, params


def test_fused_gate_kernels_and_reference_initialisation():
  _, params = _model_and_params()
  assert params['lstm_0']['input_kernel'].shape == (8, 48)
  assert params['lstm_0']['recurrent_kernel'].shape == (12, 48)
  assert params['lstm_1']['input_kernel'].shape == (12, 48)
  bound = 1 / math.sqrt(12)
  for name in ('input_kernel', 'recurrent_kernel', 'input_bias', 'recurrent_bias'):
    values = np.asarray(params['lstm_1'][name])
    assert values.min() >= -bound and values.max() <= bound and values.std() > bound / 3
  for name in ('embedding', 'decoder_kernel'):
    values = np.asarray(params[name])
    assert values.min() >= -0.1 and values.max() <= 0.1
  assert not np.any(np.asarray(params['decoder_bias']))


def test_tied_model_has_no_decoder_kernel():
  _, params = _model_and_params(tied=False)
  assert 'decoder_kernel' in params
  model = lstm.StackedLSTMLM(vocab_size=50, emsize=12, nhid=12, nlayers=1, tied=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32), model.initial_carry(1),
                      train=False)['params']
  assert 'decoder_kernel' not in params


def test_nll_path_equals_cross_entropy_of_logits():
  model, params = _model_and_params()
  tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, 50)
  targets = jax.random.randint(jax.random.key(2), (3, 7), 0, 50)
  carry = model.initial_carry(3)
  logits, carry_a = models.logits(model, params, tokens, carry)
  nll, carry_b = models.token_nll(model, params, tokens, carry, targets)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(carry_a[1][0], carry_b[1][0])
  # Gradients agree too.
  g1 = jax.grad(lambda p: jnp.sum(models.token_nll(model, p, tokens, carry, targets)[0]))(params)
  g2 = jax.grad(lambda p: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      models.logits(model, p, tokens, carry)[0], targets)))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_lstm_cell_matches_the_pytorch_equations():
  model, params = _model_and_params()
  tokens = jnp.array([[3, 4]])
  nll, ((h0, c0), _) = models.token_nll(model, params, tokens, model.initial_carry(1), tokens)
  del nll
  p = jax.tree.map(np.asarray, params)
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  h = np.zeros(12)
  c = np.zeros(12)
  for token in (3, 4):
    x = p['embedding'][token]
    gates = (x @ p['lstm_0']['input_kernel'] + h @ p['lstm_0']['recurrent_kernel']
             + p['lstm_0']['input_bias'] + p['lstm_0']['recurrent_bias'])
    i, f, g, o = np.split(gates, 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
  np.testing.assert_allclose(h0[0], h, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c0[0], c, rtol=1e-5, atol=1e-6)


def test_padding_the_last_window_changes_nothing():
  model, params = _model_and_params()
  columns = np.arange(2 * 24, dtype=np.int32).reshape(2, 24) % 50
  windows = batching.make_windows(columns, 10)  # 3 windows: 10, 10, 3 real steps
  assert windows.num_windows == 3
  np.testing.assert_array_equal(windows.weights[2].sum(axis=1), [3, 3])
  evaluate = steps.make_evaluate(model, 2)
  mean_nll = float(evaluate(params, windows))
  # The same computation by hand, window by window, without padding.
  carry, total, count = model.initial_carry(2), 0.0, 0
  for start in range(0, 23, 10):
    length = min(10, 23 - start)
    x, y = columns[:, start:start + length], columns[:, start + 1:start + 1 + length]
    nll, carry = models.token_nll(model, params, x, carry, y)
    total += float(jnp.sum(nll))
    count += nll.size
  assert mean_nll == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize('chunk_rows', [3, 6, 11, 0])
def test_fused_loss_gradient_equals_plain_autodiff(chunk_rows):
  # 8 steps x batch 3: 3 rows -> 1 step per chunk, 6 -> 2, 11 -> 2 (3 does not
  # divide 8), 0 -> plain autodiff.
  tokens = jax.random.randint(jax.random.key(1), (3, 8), 0, 50)
  targets = jax.random.randint(jax.random.key(2), (3, 8), 0, 50)
  weights = jax.random.uniform(jax.random.key(3), (3, 8)).at[:, -2:].set(0.0)
  fused = lstm.StackedLSTMLM(vocab_size=50, emsize=12, nhid=12, nlayers=1,
                             loss_chunk_rows=chunk_rows)
  params = fused.init(jax.random.key(0), tokens, fused.initial_carry(3), train=False)['params']
  carry = fused.initial_carry(3)

  def plain_loss(p):
    nll, _ = models.token_nll(fused, p, tokens, carry, targets)
    return jnp.sum(nll * weights)

  def fused_loss(p):
    return models.eval_nll_sum(fused, p, tokens, carry, targets, weights)[0]

  np.testing.assert_allclose(fused_loss(params), plain_loss(params), rtol=1e-6)
  g_fused = jax.grad(lambda p: 2.5 * fused_loss(p))(params)  # a cotangent other than 1
  g_plain = jax.grad(lambda p: 2.5 * plain_loss(p))(params)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunk_steps_is_the_largest_fitting_divisor():
  assert softmax.chunk_steps(35, 20, 128) == 5
  assert softmax.chunk_steps(35, 20, 700) == 35
  assert softmax.chunk_steps(35, 20, 10) == 1
  assert softmax.chunk_steps(35, 20, 0) == 35
  assert softmax.chunk_steps(8, 3, 11) == 2
  with pytest.raises(ValueError, match='do not divide'):
    softmax._chunked_softmax_nll_sum_fwd(jnp.zeros((7, 1, 2)), jnp.zeros((2, 3)), jnp.zeros(3),
                                         jnp.zeros((7, 1), jnp.int32), jnp.zeros((7, 1)), 2)


def test_fused_loss_in_bfloat16_gives_float32_gradients_close_to_plain():
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 50)
  weights = jnp.ones((2, 6))
  grads = {}
  for rows in (4, 0):
    model = lstm.StackedLSTMLM(vocab_size=50, emsize=12, nhid=12, nlayers=1,
                               compute_dtype=jnp.bfloat16, loss_chunk_rows=rows)
    params = model.init(jax.random.key(0), tokens, model.initial_carry(2), train=False)['params']
    grads[rows] = jax.grad(lambda p, model=model: models.eval_nll_sum(
        model, p, tokens, model.initial_carry(2), tokens, weights)[0])(params)
  for fused, plain in zip(jax.tree.leaves(grads[4]), jax.tree.leaves(grads[0])):
    assert fused.dtype == jnp.float32
    np.testing.assert_allclose(fused, plain, rtol=0.05, atol=2e-3)


def _autodiff_recurrence(projected, w_rec, carry, valid=None):
  """The LSTM recurrence as a plain scan, differentiated by JAX (the reference);
  where ``valid [T, B, 1]`` is False the state is held."""
  if valid is None:
    valid = jnp.ones(projected.shape[:2] + (1,), bool)

  def step(carry, inputs):
    x_t, v = inputs
    h0, c0 = carry
    i, f, g, o = jnp.split(x_t + h0 @ w_rec, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c0 + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    h, c = jnp.where(v, h, h0), jnp.where(v, c, c0)
    return (h, c), h

  carry, hs = jax.lax.scan(step, carry, (projected, valid))
  return hs, carry


@pytest.mark.parametrize('dtype, tolerance, steps_, unroll, in_place', [
    (jnp.float32, 1e-5, 7, 1, False), (jnp.bfloat16, 3e-2, 7, 1, False),
    # Several steps per loop iteration, with a remainder; and all of them.
    (jnp.float32, 1e-5, 11, 4, False), (jnp.float32, 1e-5, 7, 7, False),
    # The backward loop contracting w_rec in place, as it does for large kernels.
    (jnp.float32, 1e-5, 7, 1, True), (jnp.bfloat16, 3e-2, 7, 1, True)])
def test_lstm_recurrence_gradient_equals_autodiff(dtype, tolerance, steps_, unroll, in_place,
                                                  monkeypatch):
  if in_place:
    monkeypatch.setattr(lstm, '_TRANSPOSE_BELOW', 0)
  keys = jax.random.split(jax.random.key(0), 6)
  batch, hidden = 3, 5
  projected = jax.random.normal(keys[0], (steps_, batch, 4 * hidden))
  w_rec = 0.5 * jax.random.normal(keys[1], (hidden, 4 * hidden))
  carry = (jax.random.normal(keys[2], (batch, hidden)), jax.random.normal(keys[3], (batch, hidden)))
  # Cotangents on every output, the final carry included.
  d_hs = jax.random.normal(keys[4], (steps_, batch, hidden))
  d_h, d_c = jax.random.normal(keys[5], (2, batch, hidden))

  def loss(fn):
    def f(projected, w_rec, carry):
      hs, (h, c) = fn(projected, w_rec, carry)
      return jnp.sum(hs * d_hs) + jnp.sum(h * d_h) + jnp.sum(c * d_c)
    return f

  ours = lambda p, w, c: lstm.lstm_recurrence(p, w, c, None, dtype, unroll)
  np.testing.assert_allclose(loss(ours)(projected, w_rec, carry),
                             loss(_autodiff_recurrence)(projected, w_rec, carry),
                             rtol=tolerance, atol=tolerance)
  got = jax.grad(loss(ours), argnums=(0, 1, 2))(projected, w_rec, carry)
  want = jax.grad(loss(_autodiff_recurrence), argnums=(0, 1, 2))(projected, w_rec, carry)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * float(jnp.max(jnp.abs(b))))


def test_lstm_recurrence_holds_its_state_through_padding_with_the_right_gradient():
  keys = jax.random.split(jax.random.key(3), 6)
  steps_, batch, hidden = 6, 3, 4
  projected = jax.random.normal(keys[0], (steps_, batch, 4 * hidden))
  w_rec = 0.5 * jax.random.normal(keys[1], (hidden, 4 * hidden))
  carry = (jax.random.normal(keys[2], (batch, hidden)), jax.random.normal(keys[3], (batch, hidden)))
  # Row 0 real throughout, row 1 padded after 4 steps, row 2 after 1.
  valid = (jnp.arange(steps_)[:, None] < jnp.array([6, 4, 1]))[..., None]
  d_hs = jax.random.normal(keys[4], (steps_, batch, hidden))
  d_h, d_c = jax.random.normal(keys[5], (2, batch, hidden))

  def loss(fn):
    def f(projected, w_rec, carry):
      hs, (h, c) = fn(projected, w_rec, carry, valid)
      return jnp.sum(hs * d_hs) + jnp.sum(h * d_h) + jnp.sum(c * d_c)
    return f

  hs, (h, c) = lstm.lstm_recurrence(projected, w_rec, carry, valid)
  # The final state of a padded row is its state after its last real step.
  short, _ = lstm.lstm_recurrence(projected[:4], w_rec, carry)
  np.testing.assert_allclose(h[1], short[3, 1], rtol=1e-6)
  np.testing.assert_allclose(hs[5, 2], hs[0, 2], rtol=1e-6)
  got = jax.grad(loss(lstm.lstm_recurrence), argnums=(0, 1, 2))(projected, w_rec, carry)
  want = jax.grad(loss(_autodiff_recurrence), argnums=(0, 1, 2))(projected, w_rec, carry)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
