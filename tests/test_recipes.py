"""The paper rows' recipe details as the official scripts run them: configs,
the test batch, and the fine-tuning restarts of the averaging."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import make_tiny_config, run_until
from experiments.configs import ptb_onlstm, ptb_rhn, wt2_awd_lstm_mos
from selfish_jax import config as config_lib
from selfish_jax import models
from selfish_jax.data import load_corpus
from selfish_jax.training import metrics as metrics_lib
from selfish_jax.training.language_modelling import train_and_evaluate


def test_paper_configs_follow_the_official_scripts():
  onlstm = ptb_onlstm.get_config()
  # Selfish-RNN's ON-LSTM command passes no --lr: main_ONLSTM.py's default 15;
  # --finetuning 500, --finetuning2 1000; test batch 1.
  assert (onlstm.lr, onlstm.asgd_restart_epochs, onlstm.test_batch_size) == (15.0, (500, 1000), 1)
  assert wt2_awd_lstm_mos.get_config().test_batch_size == 1  # zihangdai/mos main.py
  assert ptb_rhn.get_config().rhn_init == 'selfish_rnn'  # the official models.py
  for config in (onlstm, wt2_awd_lstm_mos.get_config(), ptb_rhn.get_config()):
    config_lib.validate(config)


def _tiny(text_corpus_dir, **overrides):
  config = make_tiny_config(text_corpus_dir, dataset='text')
  config.update(eval_batch_size=16, max_steps_per_epoch=8, **overrides)
  return config


def test_test_batch_size_carries_one_state_through_the_test_text(text_corpus_dir, tmp_path):
  config = _tiny(text_corpus_dir, num_epochs=1, test_batch_size=1)
  final = train_and_evaluate(config, str(tmp_path / 'one'))
  # Batch 1: the whole test text as one sequence, from a zero state.
  corpus = load_corpus('text', text_corpus_dir, allow_download=False)
  model = models.build_model(config, corpus.vocab_size)
  manager = ocp.CheckpointManager(str(tmp_path / 'one' / 'best'))
  params = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  tokens = jnp.asarray(corpus.test, jnp.int32)[None]
  nll, _ = models.eval_nll_sum(model, params, tokens[:, :-1], model.initial_carry(1),
                                   tokens[:, 1:], jnp.ones_like(tokens[:, 1:], jnp.float32))
  assert final['test_loss'] == pytest.approx(float(nll) / (tokens.shape[1] - 1), rel=1e-5)
  config.test_batch_size = 0  # the eval batch of 16 cuts the text into 16 streams
  other = train_and_evaluate(config, str(tmp_path / 'sixteen'))
  assert other['best_val_loss'] == final['best_val_loss']
  assert other['test_loss'] != pytest.approx(final['test_loss'], rel=1e-4)


def _epochs(workdir):
  return metrics_lib.read_records(str(workdir), metrics_lib.EPOCH)


def test_averaging_restarts_at_the_given_epochs_and_resumes(text_corpus_dir, tmp_path,
                                                            monkeypatch):
  config = _tiny(text_corpus_dir, num_epochs=4, asgd_start_epoch=2, asgd_restart_epochs=(3,),
                 checkpoint_every_steps=3, log_every=1)
  final = train_and_evaluate(config, str(tmp_path / 'whole'))
  records = _epochs(tmp_path / 'whole')
  assert [r['optimizer'] for r in records] == ['sgd', 'asgd', 'asgd', 'asgd']
  assert [r['averaging_restarted'] for r in records] == [False, False, True, False]
  # The last checkpoint's counters count epoch 4's 8 steps only (16 without the restart).
  manager = ocp.CheckpointManager(str(tmp_path / 'whole' / 'checkpoints'))
  state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  counters = [np.asarray(leaf) for leaf in jax.tree.leaves(state['opt_state'])
              if np.asarray(leaf).dtype == np.int32 and np.ndim(leaf) >= 1]
  assert max(int(c.max()) for c in counters) == 8
  # Without the restart, epoch 4 validates other averages.
  config.asgd_restart_epochs = ()
  train_and_evaluate(config, str(tmp_path / 'plain'))
  assert [r['val_loss'] for r in _epochs(tmp_path / 'plain')][:3] == [
      r['val_loss'] for r in records][:3]
  assert _epochs(tmp_path / 'plain')[3]['val_loss'] != records[3]['val_loss']
  # Killed in epoch 3 (a step past its mid-epoch checkpoint): resumes across the restart exactly.
  config.asgd_restart_epochs = (3,)
  run_until(monkeypatch, lambda: train_and_evaluate(config, str(tmp_path / 'resumed')),
            lambda record: record.get('step') == 20 and 'loss' in record)
  assert train_and_evaluate(config, str(tmp_path / 'resumed')) == final
  timing = ('epoch_time_s', 'train_tokens_per_s')
  assert [{k: v for k, v in r.items() if k not in timing} for r in _epochs(tmp_path / 'resumed')
          ] == [{k: v for k, v in r.items() if k not in timing} for r in records]


@pytest.mark.parametrize('value', [(0,), ('a',), (2.5,)])
def test_bad_restart_epochs_are_named(value):
  config = config_lib.default_config()
  config.asgd_restart_epochs = value
  with pytest.raises(config_lib.ConfigError, match='asgd_restart_epochs must be a tuple'):
    config_lib.validate(config)
