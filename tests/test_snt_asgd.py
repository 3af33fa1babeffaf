"""SNT-ASGD against hand-computed references, trigger rule, optax composition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfish_jax import optim
from selfish_jax.errors import ConfigError
from selfish_jax.training import core

LR, WD, CLIP = 0.5, 0.01, 1.0


def numpy_reference(params, grads_seq, masks_seq, switch_at, dense=False):
  """SNT-ASGD written out step by step in NumPy (the paper's Sparse_ASGD rule);
  ``dense``: torch's ASGD instead (one counter, averages never zeroed)."""
  p = {k: v.copy() for k, v in params.items()}
  k = {n: np.zeros(v.shape, np.int32) for n, v in p.items()}
  ax = {n: np.zeros_like(v) for n, v in p.items()}
  history = []
  for t, (grads, masks) in enumerate(zip(grads_seq, masks_seq)):
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    scale = 1.0 if norm < CLIP else CLIP / norm
    for n in p:
      g = grads[n] * np.float32(scale) + np.float32(WD) * p[n]
      new = p[n] - np.float32(LR) * g
      m = masks[n]
      if m is not None:
        new = np.where(m, new, 0).astype(np.float32)
      p[n] = new.astype(np.float32)
      if t >= switch_at:
        k[n] = k[n] + 1 if m is None or dense else np.where(m, k[n] + 1, 0)
        mu = np.where(k[n] <= 2, 1.0, 1.0 / np.maximum(k[n] - 1, 1)).astype(np.float32)
        ax[n] = np.where(k[n] <= 2, p[n], ax[n] + (p[n] - ax[n]) * mu).astype(np.float32)
        if m is not None and not dense:
          ax[n] = np.where(m, ax[n], 0).astype(np.float32)
    history.append(({n: v.copy() for n, v in p.items()}, {n: v.copy() for n, v in ax.items()},
                    {n: v.copy() for n, v in k.items()}))
  return history


@pytest.mark.parametrize('name', ['snt_asgd', 'asgd'])
def test_matches_numpy_reference_while_the_mask_changes(name):
  rng = np.random.default_rng(0)
  shape = (3, 4)
  m0 = rng.random(shape) < 0.6
  m1 = m0.copy()
  m1[0, :] = ~m1[0, :]  # prune some weights, regrow others; the rest kept
  masks_seq = [{'w': m0, 'b': None}] * 4 + [{'w': m1, 'b': None}] * 3 + [{'w': m0, 'b': None}] * 3
  params = {'w': np.where(m0, rng.normal(size=shape), 0).astype(np.float32),
            'b': rng.normal(size=(4,)).astype(np.float32)}
  grads_seq = [{'w': rng.normal(size=shape).astype(np.float32) * 0.5,
                'b': rng.normal(size=(4,)).astype(np.float32) * 0.5} for _ in masks_seq]
  switch_at = 2
  dense = name == 'asgd'
  expected = numpy_reference(params, grads_seq, masks_seq, switch_at, dense)

  tx = optim.make_optimizer(name, LR, weight_decay=WD, clip_norm=CLIP)
  traces = []

  @jax.jit
  def step(p, state, g, m):
    traces.append(1)
    updates, state = tx.update(g, state, p, masks=m)
    return optax.apply_updates(p, updates), state

  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for t, (g, m) in enumerate(zip(grads_seq, masks_seq)):
    if t == switch_at:
      state = optim.start_averaging(state)
    p, state = step(p, state, jax.tree.map(jnp.asarray, g),
                    {n: None if v is None else jnp.asarray(v) for n, v in m.items()})
    exp_p, exp_ax, exp_k = expected[t]
    averaging = optax.tree_utils.tree_get(
        state, 'DenseAveragingState' if dense else 'SparseAveragingState')
    for n in ('w', 'b'):
      np.testing.assert_allclose(p[n], exp_p[n], rtol=1e-6, atol=1e-7, err_msg=f'{n} step {t}')
      np.testing.assert_allclose(averaging.averages[n], exp_ax[n], rtol=1e-6, atol=1e-7)
      if dense:  # one counter for all
        assert int(averaging.step) == exp_k[n].flat[0] == max(0, t + 1 - switch_at)
      else:
        np.testing.assert_array_equal(averaging.weight_steps[n], exp_k[n])
  assert len(traces) == 1  # mask changes and the switch never recompile
  ax_w = np.asarray(averaging.averages['w'])
  if dense:  # averages of inactive weights kept averaging; evaluation masks them
    assert np.any(ax_w[~m0] != 0)
    evaluated = optim.averaged_params(state, p, {'w': jnp.asarray(m0), 'b': None})
    np.testing.assert_array_equal(np.asarray(evaluated['w'])[~m0], 0)
    np.testing.assert_array_equal(np.asarray(evaluated['w'])[m0], ax_w[m0])
  else:
    # Inactive weights have zero averages; reactivated weights restarted their count.
    assert np.all(ax_w[~m0] == 0)
    np.testing.assert_array_equal(np.asarray(averaging.weight_steps['w'])[0][m0[0] & ~m1[0]], 3)


def test_average_is_the_mean_of_iterates_from_the_second_step():
  # One weight, constant gradient 1, no clipping/decay: iterates p_t = 1 - t * lr.
  tx = optim.snt_asgd(0.1, weight_decay=0.0, clip_norm=None)
  p = {'w': jnp.ones((1,))}
  state = optim.start_averaging(tx.init(p))
  iterates = []
  for _ in range(6):
    updates, state = tx.update({'w': jnp.ones((1,))}, state, p, masks={'w': jnp.ones((1,), bool)})
    p = optax.apply_updates(p, updates)
    iterates.append(float(p['w'][0]))
  averaged = float(optim.averaged_params(state, p)['w'][0])
  # k=1,2: ax = p; k>=3: running mean of p_2..p_k  (mu = 1/(k-1)).
  assert averaged == pytest.approx(np.mean(iterates[1:]), rel=1e-6)
  assert averaged == pytest.approx((0.8 + 0.7 + 0.6 + 0.5 + 0.4) / 5, rel=1e-6)


def test_averaged_params_are_the_params_before_the_switch():
  tx = optim.snt_asgd(0.1)
  p = {'w': jnp.arange(3.0)}
  state = tx.init(p)
  assert not bool(optim.is_averaging(state))
  np.testing.assert_array_equal(optim.averaged_params(state, p)['w'], p['w'])
  assert bool(optim.is_averaging(optim.start_averaging(state)))


def test_composes_with_inject_hyperparams_and_chain():
  tx = optax.chain(optax.scale(1.0), optax.inject_hyperparams(optim.snt_asgd)(
      learning_rate=optax.linear_schedule(1.0, 0.5, 4), weight_decay=0.0, clip_norm=None))
  p = {'w': jnp.ones((2,)), 'b': jnp.zeros((2,))}
  masks = {'w': jnp.array([True, False]), 'b': None}
  p = {'w': jnp.array([1.0, 0.0]), 'b': jnp.zeros((2,))}
  state = optim.start_averaging(tx.init(p))
  updates, state = jax.jit(lambda g, s, p, m: tx.update(g, s, p, masks=m))(
      {'w': jnp.ones(2), 'b': jnp.ones(2)}, state, p, masks)
  np.testing.assert_allclose(updates['w'], [-1.0, 0.0])  # masked position stays 0
  np.testing.assert_allclose(updates['b'], [-1.0, -1.0])
  assert float(state[1].hyperparams['learning_rate']) == pytest.approx(1.0)


@pytest.mark.parametrize('losses,loss,nonmono,expected', [
    ([5, 4, 3], 3.5, 5, False),  # too few epochs
    ([5, 4, 3, 2, 1, 0.9], 4.5, 5, False),  # not worse than min(L[:-5]) = 5
    ([5, 4, 3, 2, 1, 0.9], 5.5, 5, True),
    ([3.0, 2.0], 2.5, 0, True),  # nonmono 0: worse than every earlier loss's min
    ([3.0, 2.0], 1.5, 0, False),
])
def test_nonmonotone_trigger(losses, loss, nonmono, expected):
  assert core.nonmonotone_trigger(losses, loss, nonmono) is expected


def test_averaging_starts_at_the_fixed_epoch_or_on_the_trigger():
  improving = [5.0, 4.0, 3.0, 2.0, 1.0, 0.9, 0.8]
  # start_epoch 8: the switch after epoch 7, so epoch 8 is the first averaged one.
  assert [core.averaging_starts(e, improving[:e - 1], improving[e - 1], 5, 8)
          for e in range(1, 8)] == [False] * 6 + [True]
  assert core.averaging_starts(1, [], 9.0, 5, 1)  # averaging from the start
  assert not core.averaging_starts(7, improving[:6], 0.8, 5)  # no fixed epoch, improving
  assert core.averaging_starts(7, improving[:6], 5.5, 5)  # the trigger alone


@pytest.mark.parametrize('name,param_sized_buffers', [
    ('snt_asgd', 2),  # per-weight counters and averages
    ('asgd', 1),  # averages (one counter)
    ('sgd', 0), ('momentum', 1), ('adam', 2)])
def test_only_the_averaging_optimizers_carry_averaging_state(name, param_sized_buffers):
  params = {'w': jnp.ones((30, 40)), 'b': jnp.zeros((40,))}
  tx = optim.make_optimizer(name, 0.1)
  state = tx.init(params)
  leaves = [x for x in jax.tree.leaves(state) if jnp.ndim(x) > 0]
  assert sum(x.size for x in leaves) == param_sized_buffers * (30 * 40 + 40)
  assert bool(optim.is_averaging(state)) is False
  assert optim.can_average(state) == (name in ('snt_asgd', 'asgd'))
  if not optim.can_average(state):  # nothing averaged: the params themselves
    assert optim.averaged_params(state, params) is params
  if not optim.can_average(state):
    with pytest.raises(ValueError, match='no averaging'):
      optim.start_averaging(state)
  # Every optimizer re-masks: an inactive weight stays exactly zero.
  masks = {'w': jnp.zeros((30, 40), bool).at[0].set(True), 'b': None}
  updates, _ = tx.update({'w': jnp.ones((30, 40)), 'b': jnp.ones(40)}, state, params, masks=masks)
  new = optax.apply_updates(params, updates)
  assert float(jnp.abs(new['w'][1:]).max()) == 0.0 and float(jnp.abs(new['w'][0]).min()) > 0


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_lr_factor_scales_one_step_of_every_optimizer(name):
  # Variable-length BPTT passes lr_factor = length / bptt: that step's size scales.
  tx = optim.make_optimizer(name, 0.5, weight_decay=1e-3, clip_norm=0.25)
  p = {'w': jnp.array([1.0, -2.0, 3.0])}
  masks = {'w': jnp.array([True, True, False])}
  g = {'w': jnp.array([0.3, -0.4, 0.5])}
  state = tx.init(p)
  full, _ = tx.update(g, state, p, masks=masks)
  scaled, _ = tx.update(g, state, p, masks=masks, lr_factor=0.75)
  default, _ = tx.update(g, state, p, masks=masks, lr_factor=1.0)
  np.testing.assert_allclose(default['w'], full['w'])
  np.testing.assert_allclose(scaled['w'][:2], 0.75 * full['w'][:2], rtol=1e-6)
  assert float(scaled['w'][2]) == -3.0  # the inactive weight is still zeroed


@pytest.mark.parametrize('name', ['snt_asgd', 'asgd'])
def test_restart_averages_only_the_iterates_after_it(name):
  # One weight, constant gradient 1, no clipping/decay: iterates p_t = 1 - t * lr.
  tx = optim.make_optimizer(name, 0.1, weight_decay=0.0, clip_norm=None)
  p = {'w': jnp.ones((1,))}
  masks = {'w': jnp.ones((1,), bool)}
  state = optim.start_averaging(tx.init(p))
  iterates = []
  for t in range(8):
    if t == 4:
      state = optim.restart_averaging(state)
      assert bool(optim.is_averaging(state))  # still on
    updates, state = tx.update({'w': jnp.ones((1,))}, state, p, masks=masks)
    p = optax.apply_updates(p, updates)
    iterates.append(float(p['w'][0]))
  # After the restart: k = 1, 2 take the weights, then the running mean of p_5..p_7 (0-based).
  averaged = float(optim.averaged_params(state, p)['w'][0])
  assert averaged == pytest.approx(np.mean(iterates[5:]), rel=1e-6)
  with pytest.raises(ValueError, match='no averaging to restart'):
    optim.restart_averaging(optim.make_optimizer('sgd', 0.1).init(p))


def test_momentum_of_inactive_weights_is_zeroed_after_every_step():
  """The reference's apply_mask: buf <- mask * (mu * buf + g); p <- mask * (p - lr * buf).
  A weight regrown after being inactive starts with zero momentum."""
  lr, mu = 0.5, 0.9
  rng = np.random.default_rng(0)
  m0 = np.array([True, True, False, False])
  m1 = np.array([True, False, True, False])  # weight 1 removed, weight 2 regrown
  masks_seq = [m0] * 3 + [m1] * 3
  grads_seq = [rng.normal(size=4).astype(np.float32) for _ in masks_seq]
  tx = optim.make_optimizer('momentum', lr, weight_decay=0.0, clip_norm=None, momentum=mu)
  p = {'w': jnp.asarray(np.where(m0, 1.0, 0.0), jnp.float32)}
  state = tx.init(p)
  want_p, buf = np.asarray(p['w']), np.zeros(4, np.float32)
  for g, m in zip(grads_seq, masks_seq):
    updates, state = tx.update({'w': jnp.asarray(g)}, state, p, masks={'w': jnp.asarray(m)})
    p = optax.apply_updates(p, updates)
    buf = np.where(m, mu * buf + g, 0.0).astype(np.float32)
    want_p = np.where(m, want_p - lr * buf, 0.0).astype(np.float32)
    np.testing.assert_allclose(optim.first_moment(state)['w'], buf, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p['w'], want_p, rtol=1e-6, atol=1e-7)
  # The regrown weight's first step used its gradient alone: no stale momentum.
  assert float(optim.first_moment(state)['w'][3]) == 0.0


def test_adam_moments_of_inactive_weights_are_zeroed():
  tx = optim.make_optimizer('adam', 0.1)
  p = {'w': jnp.ones((3,)), 'b': jnp.ones((3,))}
  masks = {'w': jnp.array([True, False, True]), 'b': None}
  state = tx.init(p)
  for _ in range(2):
    updates, state = tx.update({'w': jnp.ones(3), 'b': jnp.ones(3)}, state, p, masks=masks)
    p = optax.apply_updates(p, updates)
  adam = optax.tree_utils.tree_get(state, 'ScaleByAdamState')
  for moment in (adam.mu, adam.nu):
    np.testing.assert_array_equal(np.asarray(moment['w']) == 0, [False, True, False])
    assert np.all(np.asarray(moment['b']) > 0)  # dense leaves keep theirs
  assert int(adam.count) == 2


def test_first_moment_is_found_by_name_in_any_state():
  p = {'w': jnp.zeros(3)}
  g = {'w': jnp.array([1.0, -2.0, 0.5])}
  for name, b1 in (('momentum', 0.9), ('adam', 0.8)):
    tx = optim.make_optimizer(name, 0.1, weight_decay=0.0, clip_norm=None, momentum=b1)
    _, state = tx.update(g, tx.init(p), p, masks={'w': None})
    # One step from zero: momentum's trace is g; Adam's mu is (1 - b1) * g.
    want = g['w'] if name == 'momentum' else (1 - b1) * g['w']
    np.testing.assert_allclose(optim.first_moment(state)['w'], want, rtol=1e-6)
  with pytest.raises(ConfigError, match='keeps no first moment'):
    optim.first_moment(optim.make_optimizer('sgd', 0.1).init(p))
