"""The library as a JAX researcher uses it, from the README alone: imports,
any optax optimizer made sparse, partitions and wrappers, serialisation,
mask research inside jit/vmap/scan, per-matrix densities, and the examples
(examples/*.py, each run here so they cannot rot)."""

import importlib.util
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from selfish_jax import optim, sparsity
from selfish_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'examples', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(nn.relu(nn.Dense(16)(x)))


@pytest.fixture(scope='module')
def problem():
  """A user's model: params, bool masks at density 0.3 (params masked), a loss."""
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (64, 8))
  y = jnp.argmax(x[:, :5], axis=1)
  params = model.init(jax.random.key(1), x[:1])['params']
  masks = sparsity.init_masks(jax.random.key(2), params, 0.3)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, x), y).mean()
  return sparsity.apply_masks(params, masks), masks, loss


def _train(tx, params, loss, steps=6, state=None, **update_kwargs):
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params, **update_kwargs)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _inactive_max(params, masks):
  return max(float(jnp.abs(jnp.where(m, 0.0, p)).max())
             for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=lambda x: x is None))
             if m is not None)


# 1. It imports as documented, and per-leaf results share one key style.

def test_it_imports_as_the_readme_says_and_keys_leaves_one_way(problem):
  done = subprocess.run([sys.executable, '-c', (
      'import selfish_jax; selfish_jax.optim.snt_asgd(20.0); selfish_jax.optim.sparsify; '
      'from selfish_jax.sparsity import Method, make_method, METHODS; '
      'assert set(METHODS) >= {"selfish", "rigl", "snfs"}')], cwd=ROOT,
      env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  params, masks, _ = problem
  names = {"['Dense_0']['kernel']", "['Dense_1']['kernel']"}
  for result in (sparsity.mask_budgets(params, 0.3), sparsity.leaf_densities(params, 0.3),
                 sparsity.active_counts(masks), sparsity.topology_distance(masks, masks),
                 sparsity.itop_rate(masks)['per_matrix']):
    assert set(result) == names


# 2. Masks that are not bool are refused, naming the leaf.

@pytest.mark.parametrize('dtype', [jnp.uint8, jnp.int32, jnp.float32])
def test_masks_that_are_not_bool_are_refused_naming_the_leaf(problem, dtype):
  params, masks, _ = problem
  wrong = jax.tree.map(lambda m: m.astype(dtype), masks)
  message = rf"the mask of \['Dense_0'\]\['kernel'\] has dtype {jnp.dtype(dtype).name}; masks must be bool"
  with pytest.raises(TypeError, match=message):
    sparsity.update_topology(params, wrong, jax.random.key(0), 0.5)
  with pytest.raises(TypeError, match=message):
    optim.snt_asgd(0.1).update(params, optim.snt_asgd(0.1).init(params), params, masks=wrong)
  with pytest.raises(TypeError, match=message):
    sparsity.overall_density(wrong)


# 3. Any optax optimizer, sparse, in one call; a stage after it is an error.

def test_sparsify_makes_adamw_sparse_and_a_stage_after_it_an_error(problem):
  params, masks, loss = problem
  trained, state = _train(optim.sparsify(optax.adamw(1e-2)), params, loss, masks=masks)
  assert loss(trained) < loss(params) and _inactive_max(trained, masks) == 0.0
  adam = optax.tree_utils.tree_get(state, 'ScaleByAdamState')
  for moment in (adam.mu, adam.nu):  # moments of inactive weights zeroed
    assert float(jnp.abs(jnp.where(masks['Dense_0']['kernel'], 0, moment['Dense_0']['kernel'])
                         ).max()) == 0.0
  # A momentum after the re-masking stage moves the weights a topology update turned off.
  wrong = optax.chain(optim.sparsify(optax.sgd(0.1)), optax.trace(0.9))
  state = wrong.init(params)
  update = jax.jit(lambda g, s, p, m: wrong.update(g, s, p, masks=m))
  grads = jax.grad(loss)(params)
  updates, state = update(grads, state, params, masks)
  params = optax.apply_updates(params, updates)
  moved, _ = sparsity.update_topology(params, masks, jax.random.key(3), 0.5)
  moved_masks = sparsity.update_topology(params, masks, jax.random.key(3), 0.5)[1]
  updates, state = update(grads, state, moved, moved_masks)  # the mask change: allowed once
  moved = optax.apply_updates(moved, updates)
  with pytest.raises(Exception, match='must be the last stage'):
    jax.block_until_ready(update(grads, state, moved, moved_masks))


# 4. The compositions: partition, multi_transform, a kwarg-dropping wrapper.

def test_snt_asgd_on_the_matrices_and_adam_on_the_biases(problem):
  params, masks, loss = problem
  labels = sparsity.sparse_labels(masks)
  assert labels == {'Dense_0': {'bias': 'dense', 'kernel': 'sparse'},
                    'Dense_1': {'bias': 'dense', 'kernel': 'sparse'}}
  for combine in (optax.partition, optax.multi_transform):
    tx = combine({'sparse': optim.snt_asgd(0.5, clip_norm=1.0), 'dense': optax.adam(1e-2)},
                 labels)
    trained, state = _train(tx, params, loss, masks=masks)
    assert loss(trained) < loss(params) and _inactive_max(trained, masks) == 0.0
    state = optim.start_averaging(state)  # found inside the group's state
    trained, state = _train(tx, trained, loss, steps=3, state=state, masks=masks)
    averaged = optim.averaged_params(state, trained, masks)
    np.testing.assert_array_equal(averaged['Dense_0']['bias'], trained['Dense_0']['bias'])
    assert not np.array_equal(averaged['Dense_0']['kernel'], trained['Dense_0']['kernel'])
  momentum = optax.partition({'sparse': optim.sparsify(optax.sgd(0.1, momentum=0.9)),
                              'dense': optax.adam(1e-2)}, labels)
  _, state = _train(momentum, params, loss, masks=masks)
  first = optim.first_moment(state)  # the groups' moments merged into one tree
  assert jax.tree.structure(first) == jax.tree.structure(params)


def test_a_wrapper_that_drops_keywords_takes_the_masks_from_the_state(problem):
  params, masks, loss = problem
  tx = optax.lookahead(optim.sparsify(optax.adam(1e-2)), sync_period=3, slow_step_size=0.5)
  pair = optax.LookaheadParams.init_synced(params)
  grads = jax.grad(loss)(params)
  with pytest.raises(ValueError, match=r'sparsify\(...\) got no masks: .*set_masks'):
    tx.update(grads, tx.init(pair), pair)
  state = optim.set_masks(tx.init(pair), masks)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p.fast), s, p))
  for _ in range(4):
    updates, state = step(pair, state)
    pair = optax.apply_updates(pair, updates)
  assert loss(pair.slow) < loss(params) and _inactive_max(pair.fast, masks) == 0.0


# 5. Every optimizer state serialises with flax.

@pytest.mark.parametrize('name', list(optim.OPTIMIZERS))
def test_every_optimizer_state_serialises_with_flax(problem, name):
  params, masks, loss = problem
  tx = optim.make_optimizer(name, 0.1)
  _, state = _train(tx, params, loss, steps=2, masks=masks)
  if optim.can_average(state):
    state = optim.start_averaging(state)
  back = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


# 6. Mask research inside jit, vmap and scan.

def test_the_measures_run_inside_jit_and_vmap(problem):
  params, masks, _ = problem
  other = sparsity.init_masks(jax.random.key(9), params, 0.3)
  measures = lambda a, b: (sparsity.topology_distance(a, b), sparsity.overall_density(a),
                           sparsity.active_counts(a), sparsity.itop_rate(sparsity.union_masks(a, b)),
                           sparsity.parameter_count(params, a))
  eager = jax.device_get(measures(masks, other))
  jitted = jax.device_get(jax.jit(measures)(masks, other))
  assert jax.tree.map(lambda x, y: bool(np.allclose(x, y)), eager, jitted)
  a, b = masks['Dense_0']['kernel'], other['Dense_0']['kernel']
  expected = np.sum(np.asarray(a) ^ np.asarray(b)) / (np.sum(a) + np.sum(b))
  assert float(jitted[0]["['Dense_0']['kernel']"]) == pytest.approx(expected)
  # Eight seeds' masks at once, and every pairwise distance on the device.
  stack = jax.vmap(lambda k: sparsity.init_masks(k, params, 0.3))(jax.random.split(
      jax.random.key(4), 8))
  pairwise = jax.jit(sparsity.pairwise_topology_distance)(stack)["['Dense_0']['kernel']"]
  for i, j in ((0, 1), (3, 7), (5, 5)):
    one = lambda s: jax.tree.map(lambda m: None if m is None else m[s], stack,
                                 is_leaf=lambda x: x is None)
    assert float(pairwise[i, j]) == pytest.approx(float(sparsity.topology_distance(
        one(i), one(j))["['Dense_0']['kernel']"]))
  # NNSTD's cost matrices vmap; only the matching is on the host.
  costs = jax.vmap(sparsity.neuron_distances)(stack['Dense_0']['kernel'],
                                              stack['Dense_0']['kernel'][::-1])
  assert costs.shape == (8, 5, 5)  # Dense_0 is the last layer (Flax names it first): 16 x 5


def test_traced_densities_and_schedules(problem):
  params, _, _ = problem
  densities = jnp.array([0.1, 0.3, 0.5])
  swept = jax.jit(jax.vmap(lambda d: sparsity.active_counts(sparsity.init_masks(
      jax.random.key(0), params, d, 'er'))))(densities)
  for i, d in enumerate([0.1, 0.3, 0.5]):  # the host's exact counts
    host = sparsity.mask_budgets(params, d, 'er')
    assert {k: int(v[i]) for k, v in swept.items()} == host
  rigl = sparsity.make_method('rigl', density=0.3, total_steps=1000, every_steps=100)
  traced = jax.jit(lambda s: jax.lax.scan(lambda c, t: (c, rigl.should_update(t)), 0, s)[1])(
      jnp.arange(1001))
  assert np.flatnonzero(np.asarray(traced)).tolist() == [
      s for s in range(1001) if rigl.updates_at(s, epoch_end=False)] == list(range(100, 701, 100))


# 7. Per-matrix densities.

def test_an_explicit_density_per_matrix(problem):
  params, _, _ = problem
  masks = sparsity.init_masks(jax.random.key(0), params, 0.2, density_map={
      "['Dense_0']['kernel']": 0.5, "['Dense_1']['kernel']": 1.0})
  counts = sparsity.host_numbers(sparsity.active_counts(masks))
  assert counts == {"['Dense_0']['kernel']": 40, "['Dense_1']['kernel']": 128}  # 16x5/2, all 8x16
  er = sparsity.mask_budgets(params, 0.2, 'er', density_map={"['Dense_1']['kernel']": 1.0})
  assert er == {"['Dense_0']['kernel']": round(0.2 * 80), "['Dense_1']['kernel']": 128}
  with pytest.raises(ConfigError, match=r"density_map names \[\"\['Dense_9'\]\['kernel'\]\"\]"):
    sparsity.init_masks(jax.random.key(0), params, 0.2,
                        density_map={"['Dense_9']['kernel']": 0.5})
  with pytest.raises(ConfigError, match=r"the density of \['Dense_0'\]\['kernel'\] must be in"):
    sparsity.init_masks(jax.random.key(0), params, 0.2, density_map={"['Dense_0']['kernel']": 0})


# 8. Momentum growth with any optimizer.

def test_momentum_growth_reads_the_first_moment_of_any_optimizer(problem):
  params, masks, loss = problem
  tx = optim.sparsify(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)))
  _, state = _train(tx, params, loss, masks=masks)
  snfs = sparsity.make_method('snfs', density=0.3, total_steps=10)
  _, new_masks, _ = snfs.update(params, masks, {}, jax.random.key(0), 0, optim.first_moment(state))
  assert sum(sparsity.host_numbers(sparsity.active_counts(new_masks)).values()) == sum(
      sparsity.host_numbers(sparsity.active_counts(masks)).values())


# The README's examples.

def test_example_sparsify_adamw():
  result = _example('sparsify_adamw').main(steps=100)
  assert result['losses'][-1] < 0.5 * result['losses'][0]
  assert result['counts'] == {"['Dense_0']['kernel']": 256, "['Dense_1']['kernel']": 819}


def test_example_partition():
  result = _example('partition').main(steps=200)
  assert result['losses'][-1] < 0.5 * result['losses'][0]
  assert result['averaged_loss'] < result['losses'][0]
  assert _inactive_max(result['params'], result['masks']) == 0.0


def test_example_seeds_vmap():
  result = _example('seeds_vmap').main(seeds=4, steps=60)
  assert np.all(result['losses'][:, -1] < 0.5 * result['losses'][:, 0])
  assert np.all(np.asarray(result['density']) == pytest.approx(0.2, abs=1e-3))
  distance = np.asarray(result['distance']["['Dense_1']['kernel']"])
  assert np.all(np.diag(distance) == 0) and np.all(distance[~np.eye(4, dtype=bool)] > 0.5)


def test_example_lstm_from_python():
  result = _example('lstm_from_python').main(steps=30)
  assert result['after'] < result['before'] - 0.2
  assert float(sparsity.overall_density(result['masks'])) == pytest.approx(0.33, abs=1e-3)
  assert result['gates_after'] != result['gates_before']  # the update moved the gates' budget
