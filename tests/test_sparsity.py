"""Masks, exact selection and topology updates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OPTIMISED
from selfish_jax import sparsity
from selfish_jax.errors import ConfigError
from selfish_jax.models.lstm import StackedLSTMLM, lstm_gate_layout
from selfish_jax.sparsity import select


@pytest.fixture(scope='module')
def lstm_params():
  model = StackedLSTMLM(vocab_size=500, emsize=24, nhid=32, nlayers=2)
  return model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32), model.initial_carry(1),
                    train=False)['params']


def _counts(masks):
  return {k: v for k, v in sparsity.active_counts(masks).items()}


def test_uniform_masks_have_exact_counts_and_dense_biases(lstm_params):
  masks = sparsity.init_masks(jax.random.key(1), lstm_params, 0.33)
  assert masks['lstm_0']['input_bias'] is None and masks['decoder_bias'] is None
  expected = {
      "['decoder_kernel']": round(0.33 * 32 * 500), "['embedding']": round(0.33 * 500 * 24),
      "['lstm_0']['input_kernel']": round(0.33 * 24 * 128),
      "['lstm_0']['recurrent_kernel']": round(0.33 * 32 * 128),
      "['lstm_1']['input_kernel']": round(0.33 * 32 * 128),
      "['lstm_1']['recurrent_kernel']": round(0.33 * 32 * 128)}
  assert _counts(masks) == expected
  # Different keys give different, equally sized masks.
  other = sparsity.init_masks(jax.random.key(2), lstm_params, 0.33)
  assert _counts(other) == expected
  assert not np.array_equal(masks['embedding'], other['embedding'])


def test_er_masks_hit_the_total_and_favour_small_matrices(lstm_params):
  masks = sparsity.init_masks(jax.random.key(1), lstm_params, 0.2, 'er')
  sizes = {k: v.size for k, v in zip(_counts(masks), [
      lstm_params['decoder_kernel'], lstm_params['embedding'],
      lstm_params['lstm_0']['input_kernel'], lstm_params['lstm_0']['recurrent_kernel'],
      lstm_params['lstm_1']['input_kernel'], lstm_params['lstm_1']['recurrent_kernel']])}
  counts = _counts(masks)
  assert abs(sum(counts.values()) - 0.2 * sum(sizes.values())) <= len(counts)
  densities = {k: counts[k] / sizes[k] for k in counts}
  # ER density is proportional to (n_in + n_out) / (n_in * n_out).
  assert densities["['lstm_0']['input_kernel']"] > densities["['embedding']"]
  expected_ratio = ((24 + 128) / (24 * 128)) / ((500 + 24) / (500 * 24))
  ratio = densities["['lstm_0']['input_kernel']"] / densities["['embedding']"]
  assert ratio == pytest.approx(expected_ratio, rel=0.01)


def test_er_caps_dense_layers_at_one():
  params = {'small': jnp.zeros((4, 4)), 'big': jnp.zeros((400, 400))}
  densities = sparsity.leaf_densities(params, 0.5, 'er')
  assert densities["['small']"] == 1.0  # keyed by keystr path, like every per-leaf result
  total = 16 * 1.0 + 160000 * densities["['big']"]
  assert total == pytest.approx(0.5 * 160016)


@pytest.mark.parametrize('density', [0.0, -0.1, 1.5, float('nan')])
def test_density_outside_unit_interval_is_rejected(lstm_params, density):
  with pytest.raises(ConfigError, match='density must be in'):
    sparsity.init_masks(jax.random.key(0), lstm_params, density)


def test_unknown_sparse_init_is_rejected(lstm_params):
  with pytest.raises(ConfigError, match="unknown sparse_init 'erk'"):
    sparsity.init_masks(jax.random.key(0), lstm_params, 0.5, 'erk')


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('sort_below', [0, select.SORT_BELOW])  # counting search, argsort
def test_select_smallest_matches_a_stable_sort(seed, sort_below):
  rng = np.random.default_rng(seed)
  n = 1000
  values = rng.normal(size=n).astype(np.float32)
  values[rng.random(n) < 0.2] = 0.0  # many ties
  values[:50] = values[50:100]  # duplicated values
  eligible = rng.random(n) < 0.6
  keys = select.magnitude_keys(jnp.asarray(values))
  for k in [0, 1, 7, 100, int(eligible.sum()), int(eligible.sum()) + 5]:
    chosen = np.asarray(select.select_smallest(keys, jnp.asarray(eligible), k, sort_below))
    order = [i for i in np.argsort(np.abs(values), kind='stable') if eligible[i]]
    expected = np.zeros(n, bool)
    expected[order[:k]] = True
    np.testing.assert_array_equal(chosen, expected, err_msg=f'k={k}')


@pytest.mark.parametrize('k', [1, 5_000, 30_000, 59_000])
def test_selection_on_a_large_array_with_many_ties_matches_a_stable_sort(k):
  # Large enough for several counting passes; ~27,000 eligible zeros (the k=1
  # and 5,000 cuts fall among them) exceed what a search finishes by sorting rows.
  rng = np.random.default_rng(k)
  n = 130_000
  values = rng.normal(size=n).astype(np.float32)
  values[rng.random(n) < 0.3] = 0.0
  values[:2000] = values[2000:4000]
  eligible = rng.random(n) < 0.7
  expected = np.zeros(n, bool)
  order = [i for i in np.argsort(np.abs(values), kind='stable') if eligible[i]]
  expected[order[:k]] = True
  chosen = select.smallest_magnitudes(jnp.asarray(values), jnp.asarray(eligible), k,
                                      sort_below=0)  # the counting search
  np.testing.assert_array_equal(chosen, expected)
  # Largest first (the complemented float keys of gradient growth): ties again by position.
  expected = np.zeros(n, bool)
  order = [i for i in np.argsort(-np.abs(values), kind='stable') if eligible[i]]
  expected[order[:k]] = True
  chosen = select.largest_magnitudes(jnp.asarray(values), jnp.asarray(eligible), k,
                                     sort_below=0)
  np.testing.assert_array_equal(chosen, expected)
  assert int(np.sum(values[eligible] == 0)) > select._FINISH_KEYS


@pytest.mark.parametrize('key_space', select.KEY_SPACES)
def test_key_spaces_steer_the_search_but_never_change_the_result(key_space):
  # Keys crowded into a sliver of the range, unlike any space's guess (the
  # 'hashed' one starts at k/m of the whole range): extra passes, same cut.
  rng = np.random.default_rng(3)
  n = 130_000
  keys = jnp.asarray(rng.integers(1 << 20, (1 << 20) + 5_000, n, dtype=np.uint32))
  eligible = rng.random(n) < 0.5
  key_fn = select.among_false(lambda _, key, e: jnp.where(e, key, jnp.uint32(0xFFFFFFFF)))
  for k in [1, 20_000, int((~eligible).sum())]:
    cut = select.smallest_cut(key_fn, (keys, jnp.asarray(eligible)), k, key_space=key_space)
    chosen = np.asarray(cut.chosen(key_fn(select.positions((n,)), keys, jnp.asarray(eligible)),
                                   select.positions((n,))))
    # among_false: the entries whose flag is False are the eligible ones.
    order = [i for i in np.argsort(np.asarray(keys), kind='stable') if not eligible[i]]
    expected = np.zeros(n, bool)
    expected[order[:k]] = True
    np.testing.assert_array_equal(chosen, expected, err_msg=f'k={k}')


def test_unknown_key_space_is_rejected():
  with pytest.raises(ValueError, match='key space'):
    select.smallest_cut(select.smallest_magnitude_keys, (jnp.ones(8), jnp.ones(8, bool)), 2,
                        key_space='log')


def test_select_largest_on_signed_values():
  values = jnp.array([-3.0, 2.0, -0.5, 7.0, 2.0, -9.0])
  chosen = select.select_largest(select.sortable_keys(values), jnp.ones(6, bool), 3)
  np.testing.assert_array_equal(chosen, [False, True, False, True, True, False])


def test_random_keys_are_distinct_and_seeded():
  a = np.asarray(select.random_keys(jax.random.key(0), (300, 70)))
  assert len(np.unique(a)) == a.size
  assert not np.array_equal(a, np.asarray(select.random_keys(jax.random.key(1), (300, 70))))


def test_death_rate_schedule_is_cosine_and_clamped():
  schedule = sparsity.death_rate_schedule(0.8, 1000)
  assert float(schedule(0)) == pytest.approx(0.8)
  assert float(schedule(500)) == pytest.approx(0.005 + 0.795 * 0.5)
  assert float(schedule(250)) == pytest.approx(0.005 + 0.795 * 0.5 * (1 + math.cos(math.pi / 4)))
  assert float(schedule(1000)) == pytest.approx(0.005)
  assert float(schedule(5000)) == pytest.approx(0.005)


def test_update_leaf_removes_smallest_and_regrows_new_weights_at_zero():
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(20, 40)).astype(np.float32)
  mask = np.zeros(800, bool)
  mask[rng.choice(800, 300, replace=False)] = True
  mask = mask.reshape(20, 40)
  weights = np.where(mask, weights, 0)
  new_w, new_m = jax.jit(sparsity.update_leaf)(jnp.asarray(weights), jnp.asarray(mask),
                                               jax.random.key(3), 0.3)
  new_w, new_m = np.asarray(new_w), np.asarray(new_m)
  removed_count = math.ceil(0.3 * 300)
  assert new_m.sum() == 300
  active_magnitudes = np.sort(np.abs(weights[mask]))
  threshold = active_magnitudes[removed_count - 1]
  survivors = mask & (np.abs(weights) > threshold)
  assert survivors.sum() == 300 - removed_count
  np.testing.assert_array_equal(new_m & survivors, survivors)  # survivors kept
  np.testing.assert_array_equal(new_w[survivors], weights[survivors])
  grown = new_m & ~survivors
  assert grown.sum() == removed_count
  assert np.all(new_w[grown & ~mask] == 0.0)  # weights new to the mask start at 0
  regrown = grown & mask  # removed, then regrown in the same place: the value stays
  assert regrown.sum() > 0
  np.testing.assert_array_equal(new_w[regrown], weights[regrown])
  assert np.all(new_w[~new_m] == 0.0)


def test_gradient_growth_picks_largest_inactive_gradients():
  rng = np.random.default_rng(1)
  weights = rng.normal(size=(10, 30)).astype(np.float32)
  mask = rng.random((10, 30)) < 0.5
  weights = np.where(mask, weights, 0)
  grads = rng.normal(size=(10, 30)).astype(np.float32)
  params, masks = {'w': jnp.asarray(weights)}, {'w': jnp.asarray(mask)}
  _, new_masks = sparsity.update_topology(params, masks, jax.random.key(0), 0.25,
                                          growth='gradient', scores={'w': jnp.asarray(grads)})
  k = math.ceil(0.25 * mask.sum())
  order = np.argsort(np.abs(weights[mask]), kind='stable')
  survivors = mask.copy()
  survivors[tuple(np.argwhere(mask)[order[:k]].T)] = False
  inactive = ~survivors
  top = np.argsort(-np.where(inactive, np.abs(grads), -1).ravel(), kind='stable')[:k]
  expected = survivors.ravel().copy()
  expected[top] = True
  np.testing.assert_array_equal(np.asarray(new_masks['w']).ravel(), expected)


def test_counts_stay_exact_over_many_updates(lstm_params):
  masks = sparsity.init_masks(jax.random.key(1), lstm_params, 0.33)
  params = sparsity.apply_masks(lstm_params, masks)
  expected = _counts(masks)
  update = jax.jit(lambda p, m, k, d: sparsity.update_topology(p, m, k, d))
  perturb = jax.jit(lambda p, k: jax.tree.map(
      lambda x: x + 0.01 * jax.random.normal(k, x.shape), p))
  schedule = sparsity.death_rate_schedule(0.8, 12)
  for step in range(12):
    params = sparsity.apply_masks(perturb(params, jax.random.key(100 + step)), masks)
    params, masks = update(params, masks, jax.random.key(step), schedule(step))
    assert _counts(masks) == expected
    for leaf, mask in zip(jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
      if mask is not None:
        assert not np.any(np.asarray(leaf)[~np.asarray(mask)])


def test_gate_densities_drift_apart_while_totals_stay_fixed():
  hidden = 64
  rng = np.random.default_rng(0)
  # Gate blocks with very different weight scales: magnitude removal takes
  # from the small-weight gates, random regrowth spreads evenly.
  scales = np.repeat([0.01, 1.0, 0.1, 1.0], hidden)
  kernel = (rng.normal(size=(hidden, 4 * hidden)) * scales).astype(np.float32)
  params = {'lstm_0': {'recurrent_kernel': jnp.asarray(kernel)}}
  masks = sparsity.init_masks(jax.random.key(0), params, 0.3)
  params = sparsity.apply_masks(params, masks)
  total = _counts(masks)["['lstm_0']['recurrent_kernel']"]
  before = sparsity.gate_densities(masks, lstm_gate_layout)["['lstm_0']['recurrent_kernel']"]
  assert max(before.values()) - min(before.values()) < 0.05
  update = jax.jit(lambda p, m, k: sparsity.update_topology(p, m, k, 0.5))
  for step in range(8):
    # Regrown weights take the scale of their gate, as training would give them.
    fresh = jax.tree.map(lambda m: jnp.asarray(
        rng.normal(size=m.shape).astype(np.float32) * scales), masks)
    params = jax.tree.map(lambda p, m, f: jnp.where(m & (p == 0), f, p), params, masks, fresh)
    params, masks = update(params, masks, jax.random.key(step))
    assert _counts(masks)["['lstm_0']['recurrent_kernel']"] == total
  after = sparsity.gate_densities(masks, lstm_gate_layout)["['lstm_0']['recurrent_kernel']"]
  assert after['f'] > before['f'] + 0.05 and after['o'] > before['o'] + 0.05
  assert after['i'] < before['i'] - 0.1
  assert sum(after.values()) * hidden * hidden == pytest.approx(total)


def test_topology_distance():
  a = {'w': jnp.array([True, True, False, False]), 'b': None}
  b = {'w': jnp.array([True, False, True, False]), 'b': None}
  assert sparsity.topology_distance(a, a) == {"['w']": 0.0}
  assert sparsity.topology_distance(a, b) == {"['w']": 0.5}
  c = {'w': jnp.array([False, False, True, True]), 'b': None}
  assert sparsity.topology_distance(a, c) == {"['w']": 1.0}


def _stable_selection(keys, eligible, k, largest):
  """The k eligible entries with the smallest (largest) keys, ties to the lower index: NumPy."""
  keys = np.asarray(keys).astype(np.int64 if np.asarray(keys).dtype.kind in 'iu' else np.float64)
  flat_keys, flat_eligible = keys.ravel(), np.asarray(eligible).ravel()
  order = np.argsort(-flat_keys if largest else flat_keys, kind='stable')
  chosen = np.zeros(flat_keys.size, bool)
  chosen[order[flat_eligible[order]][:k]] = True
  return chosen.reshape(keys.shape)


@pytest.mark.parametrize('shape', [(97, 89), (120, 50)])  # materialised and lazy key paths
@pytest.mark.parametrize('sort_below', [0, select.SORT_BELOW])  # counting search, argsort
def test_lazy_selections_match_a_numpy_stable_sort(shape, sort_below):
  rng = np.random.default_rng(0)
  eligible = jnp.asarray(rng.random(shape) < 0.4)
  values = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  key = jax.random.key(7)
  np.testing.assert_array_equal(
      select.random_subset(key, eligible, 300, sort_below=sort_below),
      _stable_selection(select.random_keys(key, shape), eligible, 300, largest=True))
  np.testing.assert_array_equal(
      select.smallest_magnitudes(values, eligible, 123, sort_below=sort_below),
      _stable_selection(np.abs(np.asarray(values)), eligible, 123, largest=False))
  np.testing.assert_array_equal(
      select.largest_magnitudes(values, eligible, 77, sort_below=sort_below),
      _stable_selection(np.abs(np.asarray(values)), eligible, 77, largest=True))
  assert int(select.count_true(eligible)) == int(np.sum(np.asarray(eligible)))
  # complement: the same choice among the False entries, never materialising ~eligible.
  np.testing.assert_array_equal(
      select.random_subset(key, eligible, 300, sort_below=sort_below, complement=True),
      select.random_subset(key, ~eligible, 300, sort_below=sort_below))
  np.testing.assert_array_equal(
      select.largest_magnitudes(values, eligible, 77, sort_below=sort_below, complement=True),
      select.largest_magnitudes(values, ~eligible, 77, sort_below=sort_below))


def test_random_subsets_are_uniform_over_positions():
  n, k, draws = 1000, 100, 2000
  eligible = jnp.ones((n,), bool)
  # The counting search (what large matrices use); the argsort ranks the same keys.
  subset = jax.jit(jax.vmap(lambda key: select.random_subset(key, eligible, k, sort_below=0)))
  keys = jax.random.split(jax.random.key(0), draws)
  # 2000 searches run for seconds unoptimised: compiled optimised, they take a quarter.
  chosen = np.asarray(subset.lower(keys).compile(compiler_options=OPTIMISED)(keys))
  counts = chosen.sum(axis=0)
  assert counts.sum() == k * draws
  expected = draws * k / n
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  # 999 degrees of freedom: mean 999, sd ~45; 1200 is beyond 4 sd.
  assert 800 < chi2 < 1200, chi2
  # Neighbouring positions are chosen independently (no stripes from the hash).
  together = np.mean(chosen[:, :-1] & chosen[:, 1:])
  assert together == pytest.approx((k / n) * ((k - 1) / (n - 1)), abs=0.002)


def test_successive_regrowths_are_independent_draws():
  # Whatever removal takes, a regrowth that draws its k positions uniformly
  # and independently of earlier draws leaves a never-active position so with
  # probability 1 - k / free, so after updates u the fraction ever active is
  # 1 - (1 - d) * prod_u (1 - k_u / (n - active + k_u)). Correlated hashes
  # (one update's draw favouring another's positions) would fall short of it.
  shape, density = (300, 400), 0.33
  n = shape[0] * shape[1]
  rng = np.random.default_rng(0)
  mask = jnp.asarray(rng.random(shape) < density)
  active = int(mask.sum())
  ever = np.array(mask)
  never = 1 - active / n
  update = jax.jit(sparsity.update_leaf)
  for u, rate in enumerate([0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]):
    weights = jnp.where(mask, jnp.asarray(rng.normal(size=shape), jnp.float32), 0.0)
    _, mask = update(weights, mask, jax.random.key(u), rate)
    ever |= np.asarray(mask)
    k = math.ceil(np.float32(rate) * np.float32(active))
    never *= 1 - k / (n - active + k)
  assert int(mask.sum()) == active
  expected = 1 - never
  sd = math.sqrt(expected * (1 - expected) / n)
  assert abs(ever.mean() - expected) < 4 * sd, (ever.mean(), expected, sd)


def test_nnstd_matches_neurons_before_comparing_their_input_sets():
  a = np.array([[1, 0], [1, 1], [0, 1]], bool)  # column inputs {0, 1} and {1, 2}
  b = np.array([[1, 0], [0, 1], [0, 1]], bool)  # {0} and {1, 2}
  # Jaccard distances: a0-b0 1/2, a0-b1 2/3, a1-b0 1, a1-b1 0: best pairing 0-0, 1-1.
  assert sparsity.nnstd(a, b) == pytest.approx((0.5 + 0.0) / 2)
  rng = np.random.default_rng(0)
  mask = rng.random((30, 40)) < 0.3
  permuted = mask[:, rng.permutation(40)]
  assert sparsity.nnstd(mask, mask) == 0.0
  assert sparsity.nnstd(mask, permuted) == 0.0  # the same network with neurons renamed
  assert sparsity.topology_distance({'w': mask}, {'w': permuted})["['w']"] > 0.5
  top, bottom = mask.copy(), mask.copy()
  top[15:], bottom[:15] = False, False
  assert sparsity.nnstd(top, bottom) == 1.0  # no input in common for any pairing
  # Too wide to match (a vocabulary): compared column by column.
  assert sparsity.nnstd(mask, permuted, max_matched=10) > 0.5
  other = rng.random((30, 40)) < 0.3
  tree = sparsity.nnstd_tree({'w': mask, 'b': None}, {'w': other, 'b': None})
  assert list(tree) == ["['w']"] and 0.5 < tree["['w']"] < 1.0
