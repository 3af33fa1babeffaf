"""Gradient growth ranks the gradient of the training step just before the update."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import make_tiny_config, run_until
from selfish_jax.training import metrics as metrics_lib
from selfish_jax.training import core, steps, train


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
  real_make_train_step, real_build_method = steps.make_train_step, core.build_method

  def recording_train_step(grad_fn, tx):
    train_step = real_make_train_step(grad_fn, tx)

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

  monkeypatch.setattr(steps, 'make_train_step', recording_train_step)
  monkeypatch.setattr(core, 'build_method', recording_build_method)
  train.train_and_evaluate(config, str(tmp_path))
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
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  run_until(monkeypatch, lambda: train.train_and_evaluate(config, str(tmp_path / 'resumed')),
            lambda record: record.get('step') == 13 and 'loss' in record)
  assert train.train_and_evaluate(config, str(tmp_path / 'resumed')) == uninterrupted
  timing = ('epoch_time_s', 'train_tokens_per_s', 'ms_per_step', 'tokens_per_s')
  records = [[{k: v for k, v in r.items() if k not in timing}
              for r in metrics_lib.read_records(str(tmp_path / run), metrics_lib.EPOCH)]
             for run in ('whole', 'resumed')]
  assert records[0] == records[1] and len(records[0]) == 2
