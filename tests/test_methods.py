"""Each sparse-training method's defining behaviour and its parameter count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfish_jax import sparsity
from selfish_jax.errors import ConfigError
from selfish_jax.sparsity import methods



def _normal_like(tree, seed=1):
  """Standard normal draws shaped like ``tree``, from a generator of the test's own."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), tree)


def _problem(density=0.4, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {'a': (30, 40), 'b': (20, 64), 'bias': (64,)}
  params = {k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}
  masks = sparsity.init_masks(jax.random.key(0), params, density)
  return sparsity.apply_masks(params, masks), masks


def _count(m):
  return int(np.sum(np.asarray(m)))


def _make(name, **kwargs):
  kwargs = {'density': 0.4, 'death_rate': 0.5, 'total_steps': 1000, 'every_steps': 10, **kwargs}
  return methods.make_method(name, **kwargs)


@pytest.mark.parametrize('name', ['selfish', 'set', 'rigl'])
def test_per_matrix_methods_keep_every_count(name):
  params, masks = _problem()
  method = _make(name)
  before = {k: _count(masks[k]) for k in ('a', 'b')}
  scores = _normal_like(params)
  update = jax.jit(method.update)
  for step in (10, 20, 30):
    params, masks, _ = update(params, masks, method.initial_state, jax.random.key(step), step,
                              scores if method.grows_by else None)
    assert {k: _count(masks[k]) for k in ('a', 'b')} == before
    assert masks['bias'] is None


def test_rigl_grows_the_inactive_entries_with_largest_gradient():
  params, masks = _problem()
  method = _make('rigl')
  grads = _normal_like(params)
  new_params, new_masks, _ = method.update(params, masks, {}, jax.random.key(1), 0, grads)
  w, m, g = (np.asarray(x['a']) for x in (params, masks, grads))
  k = math.ceil(0.5 * m.sum())  # drop fraction at step 0 is death_rate
  survivors = m.copy()
  order = np.argsort(np.abs(w[m]), kind='stable')[:k]
  survivors[tuple(np.argwhere(m)[order].T)] = False
  candidates = np.where(~survivors, np.abs(g), -1).ravel()
  grown = np.zeros(m.size, bool)
  grown[np.argsort(-candidates, kind='stable')[:k]] = True
  np.testing.assert_array_equal(np.asarray(new_masks['a']).ravel(), survivors.ravel() | grown)
  np.testing.assert_array_equal(np.asarray(new_params['a']), np.where(m & np.asarray(
      new_masks['a']), w, 0))


@pytest.mark.parametrize('name', ['selfish', 'set', 'rigl', 'snfs', 'dsr'])
def test_weights_regrown_where_they_were_removed_keep_their_values(name):
  # The reference only changes masks, then multiplies the untouched weights by
  # the final mask: active before and after keeps its value, newly grown is 0.
  params, masks = _problem(density=0.33)
  method = _make(name, death_rate=0.8, density=0.33, dsr_initial_threshold=0.5)
  scores = _normal_like(params)
  new_params, new_masks, _ = jax.jit(method.update)(params, masks, method.initial_state,
                                                    jax.random.key(3), 0, scores)
  kept_back = 0
  for k in ('a', 'b'):
    w, old, new = (np.asarray(x[k]) for x in (params, masks, new_masks))
    np.testing.assert_array_equal(np.asarray(new_params[k]), np.where(old & new, w, 0))
    removal_ranks = np.argsort(np.argsort(np.abs(np.where(old, w, np.inf)).ravel(), kind='stable'))
    removed_then_regrown = old & new & (removal_ranks.reshape(w.shape) < math.ceil(
        0.8 * old.sum()))
    kept_back += int(np.sum(removed_then_regrown & (w != 0)))
  np.testing.assert_array_equal(new_params['bias'], params['bias'])
  if name in ('selfish', 'snfs', 'rigl'):  # magnitude removal: the ranks above are the removed
    assert kept_back > 0  # the case the rule is about does occur here


def test_rigl_updates_every_delta_t_until_the_end_with_cosine_drop_fraction():
  method = _make('rigl', total_steps=1000, every_steps=100, end_fraction=0.75)
  assert [s for s in range(0, 1001) if method.updates_at(s, epoch_end=False)] == [
      100, 200, 300, 400, 500, 600, 700]
  assert not method.updates_at(100, epoch_end=True)
  assert _make('selfish').updates_at(123, epoch_end=True)
  assert not _make('selfish').updates_at(100, epoch_end=False)
  assert not _make('static').updates_at(100, epoch_end=True)


def test_set_removes_half_positive_half_negative_near_zero():
  w = jnp.array([[0.1, 0.2, 0.3, 0.9, -0.05, -0.5, -0.01, -0.9]])
  m = jnp.ones_like(w, dtype=bool)
  removed = sparsity.topology.removal_mask(w, m, jnp.int32(4), 'set')
  np.testing.assert_array_equal(removed[0], [True, True, False, False, True, False, True, False])


def test_snfs_splits_the_regrowth_budget_by_mean_momentum():
  params, masks = _problem()
  # Matrix 'a' has 3x the momentum of 'b' on its active weights.
  momentum = {'a': jnp.full((30, 40), 3.0), 'b': jnp.full((20, 64), 1.0), 'bias': jnp.zeros(64)}
  rng = np.random.default_rng(1)
  momentum = jax.tree.map(
      lambda x: x * jnp.asarray(rng.uniform(0.9, 1.1, x.shape), jnp.float32), momentum)
  method = _make('snfs')
  active = {k: _count(masks[k]) for k in ('a', 'b')}
  _, new_masks, _ = method.update(params, masks, {}, jax.random.key(0), 0, momentum)
  removed = {k: math.ceil(0.5 * active[k]) for k in active}
  total = sum(removed.values())
  new = {k: _count(new_masks[k]) for k in ('a', 'b')}
  assert sum(new.values()) == sum(active.values())  # total count is exact
  grown = {k: new[k] - (active[k] - removed[k]) for k in active}
  mean_a = float(jnp.mean(momentum['a'][masks['a']]))
  mean_b = float(jnp.mean(momentum['b'][masks['b']]))
  assert grown['a'] == pytest.approx(total * mean_a / (mean_a + mean_b), abs=1)
  # Within a matrix, growth goes to the largest momentum among inactive positions.
  survivors_a = np.asarray(new_masks['a']) & np.asarray(masks['a'])
  grown_a = np.asarray(new_masks['a']) & ~survivors_a
  inactive = ~survivors_a
  assert np.min(np.asarray(momentum['a'])[grown_a]) >= np.max(
      np.asarray(momentum['a'])[inactive & ~grown_a])


def test_dsr_threshold_moves_toward_the_target_and_total_is_exact():
  params, masks = _problem()
  method = _make('dsr', dsr_initial_threshold=1e-4)
  total = sum(_count(masks[k]) for k in ('a', 'b'))
  state = method.initial_state
  thresholds = [float(state['threshold'])]
  update = jax.jit(method.update)
  for step in range(12):
    params, masks, state = update(params, masks, state, jax.random.key(step), 0)
    thresholds.append(float(state['threshold']))
    assert sum(_count(masks[k]) for k in ('a', 'b')) == total
  # Far too few removals at 1e-4: the threshold doubles until the removals near the target.
  assert thresholds[1] == 2 * thresholds[0]
  assert thresholds[-1] > 100 * thresholds[0]
  # The next update removes exactly the active weights below the threshold, regrows as many
  # split by surviving weights, and moves the threshold by the removed count against the target.
  threshold = thresholds[-1]
  params2, masks2, state2 = update(params, masks, state, jax.random.key(99), 0)
  removed, survivors = 0, {}
  for k in ('a', 'b'):
    w, m = np.asarray(params[k]), np.asarray(masks[k])
    survivors[k] = m & (np.abs(w) >= threshold)
    removed += int(m.sum() - survivors[k].sum())
    assert np.all(np.asarray(masks2[k])[survivors[k]])  # survivors stay
  grown = {k: _count(masks2[k]) - int(survivors[k].sum()) for k in ('a', 'b')}
  assert sum(grown.values()) == removed > 0
  kept = {k: int(survivors[k].sum()) for k in ('a', 'b')}
  assert grown['a'] == pytest.approx(removed * kept['a'] / (kept['a'] + kept['b']), abs=1)
  target = 0.5 * total  # death rate 0.5 at step 0
  expected = (2 * threshold if removed < 0.9 * target else
              threshold / 2 if removed > 1.1 * target else threshold)
  assert float(state2['threshold']) == pytest.approx(expected, rel=1e-6)


def test_allocate_is_exact_proportional_and_capped():
  shares = methods.allocate(jnp.int32(100), jnp.array([1.0, 1.0, 2.0]), jnp.array([10, 100, 100]))
  assert list(np.asarray(shares)) == [10, 30, 60]
  shares = methods.allocate(jnp.int32(7), jnp.array([1.0, 1.0, 1.0]), jnp.array([5, 5, 5]))
  assert int(jnp.sum(shares)) == 7 and max(np.asarray(shares)) - min(np.asarray(shares)) <= 1


def test_gmp_follows_the_cubic_schedule_exactly():
  params, _ = _problem()
  method = _make('gmp', density=0.2, total_steps=1000, every_steps=100, end_fraction=0.5)
  masks = method.init_masks(jax.random.key(0), params)
  assert _count(masks['a']) == 1200  # dense start
  update = jax.jit(method.update)
  for step in range(100, 1001, 100):
    if method.updates_at(step, epoch_end=False):
      params, masks, _ = update(params, masks, {}, jax.random.key(0), step)
    expected = 0.2 + 0.8 * (1 - min(step / 500, 1.0)) ** 3
    assert _count(masks['a']) == round(expected * 1200), step
  assert _count(masks['a']) == 240
  assert float(methods.gmp_density_schedule(0.2, 0, 500)(250)) == pytest.approx(0.2 + 0.8 * 0.125)


def test_gmp_reaches_the_exact_target_when_its_end_is_not_an_update_step():
  # 1000 steps x 0.79 = 790 is not a multiple of 100: the schedule ends at 700.
  params, _ = _problem()
  method = _make('gmp', density=0.2, total_steps=1000, every_steps=100, end_fraction=0.79)
  masks = method.init_masks(jax.random.key(0), params)
  update = jax.jit(method.update)
  for step in range(1, 1001):
    if method.updates_at(step, epoch_end=False):
      params, masks, _ = update(params, masks, {}, jax.random.key(0), step)
  assert _count(masks['a']) == 240


def test_static_and_dense():
  params, _ = _problem()
  assert _make('static').update is None
  dense = _make('dense')
  assert not dense.sparse
  assert all(m is None for m in jax.tree.leaves(dense.init_masks(jax.random.key(0), params),
                                               is_leaf=lambda x: x is None))


def test_unknown_method_is_rejected():
  with pytest.raises(ConfigError, match="unknown method 'magic'"):
    _make('magic')


def test_training_flops_relative_to_dense():
  from selfish_jax import flops
  params, masks = _problem(0.25)
  dense = methods.make_method('dense', density=1.0, total_steps=100)
  once = lambda names: 1
  dense_fwd = flops.forward_flops_per_token(params, dense.init_masks(None, params), once)
  assert dense_fwd == 2 * (30 * 40 + 20 * 64)  # no embedding here; biases not counted
  sparse_fwd = flops.forward_flops_per_token(params, masks, once)
  assert sparse_fwd == pytest.approx(0.25 * dense_fwd, abs=2)
  rel = lambda name, **kw: flops.train_flops_relative(
      methods.make_method(name, density=0.25, total_steps=1000, every_steps=100, **kw),
      sparse_fwd, dense_fwd, 1000)
  assert rel('dense') == 1.0
  for name in ('static', 'selfish', 'set', 'dsr'):
    assert rel(name) == pytest.approx(sparse_fwd / dense_fwd)
  assert rel('snfs') == pytest.approx((2 * sparse_fwd + dense_fwd) / (3 * dense_fwd))
  # RigL: 7 dense-gradient steps (100..700) out of 1000.
  expected = (993 * 3 * sparse_fwd + 7 * (2 * sparse_fwd + dense_fwd)) / 1000 / (3 * dense_fwd)
  assert rel('rigl') == pytest.approx(expected)
  # GMP: the mean of its density over the run (dense start, cubic decay to 0.25 at step 700).
  cubic = [0.25 + 0.75 * (1 - min(s / 700, 1)) ** 3 for s in range(1000)]
  assert rel('gmp') == pytest.approx(np.mean(cubic), rel=1e-6)
  # Each matrix counts as often as the model multiplies it per token: the
  # embedding not at all as a lookup, once per expert as a tied MoS decoder.
  lm = {'embedding': jnp.zeros((10, 4)), 'w': jnp.zeros((4, 4))}
  uses = lambda n: lambda names: n if names == ('embedding',) else 1
  assert flops.forward_flops_per_token(lm, {'embedding': None, 'w': None}, uses(0)) == 32
  assert flops.forward_flops_per_token(lm, {'embedding': None, 'w': None}, uses(1)) == 112
  assert flops.forward_flops_per_token(lm, {'embedding': None, 'w': None}, uses(3)) == 272
