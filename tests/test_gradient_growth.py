"""Gradient growth ranks the gradient of the training step just before the update."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import make_tiny_config, run_until
from selfish_jax.training import metrics as metrics_lib
from selfish_jax.training import setup
from selfish_jax.training.core import SparseTraining
from selfish_jax.training.language_modelling import train_and_evaluate


def _gradient_config(corpus_dir, method):
  config = make_tiny_config(corpus_dir, dataset='text')
  config.update(method=method, num_epochs=2, max_steps_per_epoch=8, update_every=4,
                checkpoint_every_steps=3, log_every=1, eval_batch_size=16)
  if method == 'selfish':
    config.growth = 'gradient'
  return config


@pytest.mark.parametrize('method,update_steps', [('selfish', [8, 16]), ('rigl', [4, 8, 12])])
def test_update_scores_are_the_gradient_of_the_preceding_train_step(
    method, update_steps, text_corpus_dir, tmp_path, monkeypatch):
  """Selfish-RNN's epoch-end updates (after steps 8 and 16) and RigL's
  every-4-steps updates (until 75 % of the 16 steps) read what the step
  before computed on its own carry, window and dropout."""
  config = _gradient_config(text_corpus_dir, method)
  step_gradients, update_scores = {}, {}
  real_train_step, real_build_method = SparseTraining.train_step, setup.build_method

  def recording_train_step(self, grad_fn):
    train_step = real_train_step(self, grad_fn)

    def recorded(state, window, dropout_key, lr_factor=1.0):
      # The step's gradient recomputed from its own inputs, beside the real step.
      key = jax.random.fold_in(dropout_key, state.step)
      gradient = grad_fn(state.params, state.carry, window, key)[2]
      jax.debug.callback(lambda s, g: step_gradients.__setitem__(int(s) + 1, g), state.step,
                         gradient)
      return train_step(state, window, dropout_key, lr_factor)

    return recorded

  def recording_build_method(config, steps_per_epoch):
    method_ = real_build_method(config, steps_per_epoch)

    def update(params, masks, state, key, step, scores=None):
      jax.debug.callback(lambda s, g: update_scores.__setitem__(int(s), g), step, scores)
      return method_.update(params, masks, state, key, step, scores)

    return dataclasses.replace(method_, update=update)

  monkeypatch.setattr(SparseTraining, 'train_step', recording_train_step)
  monkeypatch.setattr(setup, 'build_method', recording_build_method)
  train_and_evaluate(config, str(tmp_path))
  jax.effects_barrier()
  assert sorted(update_scores) == update_steps
  for step in update_steps:
    for name, (scores, gradient, first) in enumerate(zip(
        jax.tree.leaves(update_scores[step]), jax.tree.leaves(step_gradients[step]),
        jax.tree.leaves(step_gradients[1]))):
      np.testing.assert_allclose(scores, gradient, rtol=1e-5, atol=1e-9, err_msg=str(name))
      assert not np.allclose(scores, first)  # not any step's: this one's


@pytest.mark.parametrize('method', ['selfish', 'rigl'])
def test_gradient_growth_resumes_to_identical_results(method, text_corpus_dir, tmp_path,
                                                      monkeypatch):
  """Killed at step 13 (2 steps past the mid-epoch checkpoint of step 11, in
  the second epoch), resumed across RigL's update at step 12 and selfish's at
  the epoch end: bit for bit the uninterrupted run."""
  config = _gradient_config(text_corpus_dir, method)
  uninterrupted = train_and_evaluate(config, str(tmp_path / 'whole'))
  run_until(monkeypatch, lambda: train_and_evaluate(config, str(tmp_path / 'resumed')),
            lambda record: record.get('step') == 13 and 'loss' in record)
  assert train_and_evaluate(config, str(tmp_path / 'resumed')) == uninterrupted
  timing = ('epoch_time_s', 'train_tokens_per_s', 'ms_per_step', 'tokens_per_s')
  records = [[{k: v for k, v in r.items() if k not in timing}
              for r in metrics_lib.read_records(str(tmp_path / run), metrics_lib.EPOCH)]
             for run in ('whole', 'resumed')]
  assert records[0] == records[1] and len(records[0]) == 2


def _sparse_scores(rows, cols, scored_rows, seed):
  """Scores like one batch's embedding gradient: nonzero in ``scored_rows`` rows only."""
  rng = np.random.default_rng(seed)
  scores = np.zeros((rows, cols), np.float32)
  scored = rng.choice(rows, scored_rows, replace=False)
  scores[scored] = rng.normal(size=(scored_rows, cols)).astype(np.float32)
  return scores


def _check_ties_spread_uniformly(old_mask, new_mask, scores, removed, k):
  """Every inactive entry with a nonzero score was grown before any tie, and the
  regrowth decided among the zero scores lands in each quarter of the rows as a
  uniform draw would (within 4 standard deviations of the hypergeometric)."""
  old_mask, new_mask = np.asarray(old_mask), np.asarray(new_mask)
  survivors = old_mask & ~removed
  grown = new_mask & ~survivors
  assert grown.sum() == k  # counts exact
  free = ~survivors
  assert np.all(grown[free & (scores != 0)])  # nonzero scores win first
  tie_pool = free & (scores == 0)
  tied = grown & tie_pool
  n, pool = int(tied.sum()), int(tie_pool.sum())
  assert 0 < n < pool
  quarters = np.array_split(np.arange(scores.shape[0]), 4)
  for rows in quarters:
    share_of_pool = tie_pool[rows].sum() / pool
    sd = np.sqrt(n * share_of_pool * (1 - share_of_pool) * (pool - n) / (pool - 1)) / n
    assert abs(tied[rows].sum() / n - share_of_pool) < 4 * sd, (tied[rows].sum() / n,
                                                                share_of_pool, sd)


@pytest.mark.parametrize('rows', [400, 2000])  # 8,000 entries: sorted; 40,000: counting search
@pytest.mark.parametrize('growth', ['gradient', 'momentum'])
def test_growth_breaks_ties_among_zero_scores_uniformly(rows, growth):
  from selfish_jax import sparsity
  from selfish_jax.sparsity import select
  cols = 20
  assert (rows * cols < select.SORT_BELOW) == (rows == 400)
  scores = _sparse_scores(rows, cols, rows // 25, seed=rows)
  rng = np.random.default_rng(1)
  weights = rng.normal(size=(rows, cols)).astype(np.float32)
  mask = np.zeros(rows * cols, bool)
  mask[rng.choice(rows * cols, rows * cols * 3 // 10, replace=False)] = True
  mask = mask.reshape(rows, cols)
  params, masks = {'w': jax.numpy.asarray(weights * mask)}, {'w': jax.numpy.asarray(mask)}
  k = int(np.ceil(0.8 * mask.sum()))
  new_params, new_masks = sparsity.update_topology(
      params, masks, jax.random.key(7), 0.8, growth=growth, scores={'w': scores})
  removed = np.asarray(select.smallest_magnitudes(params['w'], masks['w'], k))
  _check_ties_spread_uniformly(mask, new_masks['w'], scores, removed, k)
  # The order before 2026-12-06, kept under its name: every tie to the first rows.
  _, positional = sparsity.update_topology(params, masks, jax.random.key(7), 0.8, growth=growth,
                                           scores={'w': scores}, ties='lowest_position')
  tied = np.asarray(positional['w']) & ~(mask & ~removed) & (scores == 0)
  assert tied[rows // 4:].sum() == 0
  # A different key, a different draw; the same key, the same (a resume repeats it).
  _, other = sparsity.update_topology(params, masks, jax.random.key(8), 0.8, growth=growth,
                                      scores={'w': scores})
  _, again = sparsity.update_topology(params, masks, jax.random.key(7), 0.8, growth=growth,
                                      scores={'w': scores})
  assert not np.array_equal(other['w'], new_masks['w'])
  np.testing.assert_array_equal(again['w'], new_masks['w'])


def test_snfs_budget_path_breaks_ties_uniformly():
  from selfish_jax.sparsity import methods, select
  rng = np.random.default_rng(3)
  shapes = {'embedding': (2000, 20), 'kernel': (300, 40)}
  scores = {'embedding': _sparse_scores(2000, 20, 80, seed=4),
            'kernel': _sparse_scores(300, 40, 12, seed=5)}
  masks, params = {}, {}
  for name, shape in shapes.items():
    m = np.zeros(np.prod(shape), bool)
    m[rng.choice(m.size, m.size * 3 // 10, replace=False)] = True
    masks[name] = jax.numpy.asarray(m.reshape(shape))
    params[name] = jax.numpy.asarray(rng.normal(size=shape).astype(np.float32) * m.reshape(shape))
  snfs = methods.make_method('snfs', density=0.3, death_rate=0.8, total_steps=10)
  _, new_masks, _ = snfs.update(params, masks, {}, jax.random.key(11), 0, scores)
  total_before = sum(int(np.sum(m)) for m in masks.values())
  assert sum(int(np.sum(m)) for m in new_masks.values()) == total_before  # total exact
  name = 'embedding'
  k_removed = int(np.ceil(0.8 * np.sum(masks[name])))
  removed = np.asarray(select.smallest_magnitudes(params[name], masks[name], k_removed))
  grown = int(np.sum(np.asarray(new_masks[name]) & ~(np.asarray(masks[name]) & ~removed)))
  _check_ties_spread_uniformly(masks[name], new_masks[name], scores[name], removed, grown)
