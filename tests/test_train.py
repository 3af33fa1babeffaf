"""End-to-end training of a tiny model on a generated corpus: learning, switching, resuming."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfish_jax.data import load_corpus
from selfish_jax.training import metrics as metrics_lib
from selfish_jax.training.continuation import ContinuationAtSwitch
from selfish_jax.training.core import SparseTraining
from selfish_jax.training.language_modelling import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _epoch_records(workdir):
  return metrics_lib.read_records(workdir, metrics_lib.EPOCH)


# One run several tests read and compare against: selfish with gradient growth,
# 3 epochs of 10 windows, checkpoints every 4 windows, averaging from epoch 3.
REFERENCE = dict(num_epochs=3, max_steps_per_epoch=10, checkpoint_every_steps=4, log_every=2,
                 growth='gradient', asgd_start_epoch=3)


@pytest.fixture(scope='module')
def reference(text_corpus_dir, tmp_path_factory):
  """``(config, workdir, final record)`` of the reference run."""
  from conftest import make_tiny_config
  config = make_tiny_config(text_corpus_dir, dataset='text')
  config.update(**REFERENCE)
  workdir = tmp_path_factory.mktemp('reference')
  return config, workdir, train_and_evaluate(config, str(workdir))


def test_selfish_training_learns_switches_and_keeps_density(reference):
  _, workdir, final = reference
  records = metrics_lib.read_records(str(workdir / 'metrics.jsonl'))
  train_losses = [r['loss'] for r in metrics_lib.read_records(str(workdir), metrics_lib.TRAIN)]
  epochs = _epoch_records(str(workdir))
  vocab = load_corpus('text', reference[0].data_dir, allow_download=False).vocab_size
  # Loss goes down: the epoch's mean training loss, and validation below uniform guessing.
  assert len(train_losses) == 15 and epochs[-1]['train_loss'] < epochs[0]['train_loss'] - 0.05
  assert epochs[0]['train_loss'] == pytest.approx(np.mean(train_losses[:5]), rel=1e-6)
  assert epochs[-1]['val_ppl'] < epochs[0]['val_ppl'] < 0.92 * vocab
  assert [r['epoch'] for r in epochs] == [1, 2, 3]
  assert [r['optimizer'] for r in epochs] == ['sgd', 'sgd', 'asgd']  # asgd_start_epoch=3
  assert all(r['density'] == pytest.approx(0.33, abs=1e-3) for r in epochs)
  assert set(epochs[0]['gate_density']) == {
      "['lstm_0']['input_kernel']", "['lstm_0']['recurrent_kernel']",
      "['lstm_1']['input_kernel']", "['lstm_1']['recurrent_kernel']"}
  assert all('tokens_per_s' in r for r in metrics_lib.read_records(str(workdir), 'train'))
  assert [metrics_lib.record_kind(r) for r in records].count('final') == 1
  assert final['test_ppl'] == records[-1]['test_ppl'] and final['test_ppl'] < 0.92 * vocab
  assert os.listdir(workdir / 'tensorboard')


def test_epoch_records_carry_the_topology_change(reference):
  _, workdir, _ = reference
  first = _epoch_records(str(workdir))[0]
  assert set(first['topology_distance']) == {
      "['decoder_kernel']", "['embedding']", "['lstm_0']['input_kernel']",
      "['lstm_0']['recurrent_kernel']", "['lstm_1']['input_kernel']",
      "['lstm_1']['recurrent_kernel']"}
  # ceil(p * active) weights of each matrix moved, less the few regrown where
  # they were just removed.
  rate = first['death_rate']
  for name, distance in first['topology_distance'].items():
    assert 0.8 * rate < distance < rate + 0.01, (name, distance, rate)
  # The switch to averaging skips that epoch's update, as the reference does.
  assert _epoch_records(str(workdir))[1]['topology_distance'] == {}


def test_epoch_records_carry_the_itop_rate(reference):
  _, workdir, _ = reference
  epochs = _epoch_records(str(workdir))
  first = epochs[0]
  # Every weight grown in the first update was never active before, except
  # the few regrown where they had just been removed.
  for name, rate in first['itop_rate_per_matrix'].items():
    moved = first['topology_distance'][name]  # |A xor B| / 2|A|: the fraction of A replaced
    assert rate == pytest.approx(0.33 * (1 + moved), abs=2e-3), name
  totals = [r['itop_rate'] for r in epochs]
  assert totals[0] > 0.33 and totals[1] == totals[0]  # no update in the switching epoch
  assert totals[2] > totals[1]


def test_dense_training_has_no_masks(tiny_config, tmp_path):
  import orbax.checkpoint as ocp
  tiny_config.method = 'dense'
  tiny_config.num_epochs = 1
  final = train_and_evaluate(tiny_config, str(tmp_path))
  assert _epoch_records(str(tmp_path))[0]['density'] == 1.0
  # Every weight exists: embedding, 2 LSTM layers (two kernels, two biases), decoder.
  lstm = 2 * (16 * 64 + 16 * 64 + 64 + 64)
  vocab = load_corpus('text', tiny_config.data_dir, allow_download=False).vocab_size
  assert final['params'] == vocab * 16 + lstm + 16 * vocab + vocab
  manager = ocp.CheckpointManager(str(tmp_path / 'checkpoints'))
  state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  # Dense: the checkpoint holds no mask arrays (orbax writes a tree of None as empty).
  assert not [m for m in jax.tree.leaves(state['masks'], is_leaf=lambda x: x is None)
              if m is not None]
  # No weight was masked to zero (a 0.33-density mask would zero two thirds of them).
  for name in ('embedding', 'decoder_kernel'):
    assert np.count_nonzero(state['params'][name]) == state['params'][name].size


def test_interrupted_run_resumes_to_identical_results(reference, tmp_path, monkeypatch):
  from conftest import run_until
  config, reference_dir, reference_final = reference
  # Die at step 26 (epoch 3, after the switch, 2 steps past a mid-epoch checkpoint)...
  run_until(monkeypatch, lambda: train_and_evaluate(config, str(tmp_path)),
            lambda record: record.get('step') == 26 and 'loss' in record)
  # ...and start again with the same workdir.
  assert train_and_evaluate(config, str(tmp_path)) == reference_final
  timing = ('epoch_time_s', 'train_tokens_per_s')
  assert [{k: v for k, v in r.items() if k not in timing} for r in _epoch_records(str(tmp_path))
          ] == [{k: v for k, v in r.items() if k not in timing}
                for r in _epoch_records(str(reference_dir))]


def _cli(workdir, data_dir, *overrides):
  """The command line of a tiny run; with no overrides, that of the reference run."""
  return [sys.executable, '-m', 'experiments.main', '--config=experiments/configs/ptb_lstm_small.py',
          f'--workdir={workdir}',
          '--config.dataset=text', f'--config.data_dir={data_dir}', '--config.download=False',
          '--config.emsize=16',
          '--config.nhid=16', '--config.batch_size=4', '--config.eval_batch_size=64',
          '--config.bptt=5', '--config.lr=5', '--config.dropout=0.1', '--config.death_rate=0.5',
          *(f'--config.{k}={v}' for k, v in REFERENCE.items()), *overrides]


@pytest.mark.parametrize('override,message', [
    ('--config.densty=0.5', "unknown config key 'densty' (did you mean 'density'?)"),
    ('--config.data_dir=/nonexistent', 'missing data file: no train.txt or train.txt.gz'),
])
def test_user_errors_are_one_line(text_corpus_dir, tmp_path, override, message):
  result = subprocess.run(_cli(tmp_path, text_corpus_dir, override), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {message}'), lines
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


@pytest.mark.parametrize('key,value,message', [
    ('density', 0, 'density must be in (0, 1], got 0'),
    ('density', 1.5, 'density must be in (0, 1], got 1.5'),
    ('method', 'magic', "unknown method 'magic'"),
    ('sparse_init', 'erk', "unknown sparse_init 'erk'"),
    ('dataset', 'ptb3', "unknown dataset 'ptb3'"),
    ('optimizer', 'lion', "unknown optimizer 'lion'"),
    ('growth', 'magic', "unknown growth 'magic'"),
    ('batch_size', 0, 'batch_size must be an integer >= 1, got 0'),
])
def test_bad_config_values_are_named(tiny_config, tmp_path, key, value, message):
  from selfish_jax.errors import ConfigError
  tiny_config[key] = value
  with pytest.raises(ConfigError) as error:
    train_and_evaluate(tiny_config, str(tmp_path))
  assert str(error.value).startswith(message)
  assert not os.listdir(tmp_path)  # nothing written


def test_snfs_without_momentum_is_refused(tiny_config, tmp_path):
  from selfish_jax.errors import ConfigError
  tiny_config.update(method='snfs', optimizer='sgd')
  with pytest.raises(ConfigError, match=r"needs an optimizer with a first moment \(one of \('momentum', 'adam'\)\), not 'sgd'"):
    train_and_evaluate(tiny_config, str(tmp_path))


def test_resuming_with_a_different_config_is_refused(tiny_config, tmp_path):
  saved = tiny_config.to_dict()
  saved['density'] = 0.5
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  tiny_config.log_every = 1  # harmless on its own
  from selfish_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r'different config \(density: 0.5 -> 0.33\)'):
    train_and_evaluate(tiny_config, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['config.json']  # nothing else written


@pytest.mark.parametrize('method,optimizer', [
    ('static', 'sgd'), ('set', 'snt_asgd'), ('rigl', 'adam'), ('snfs', 'momentum'),
    ('dsr', 'sgd'), ('gmp', 'momentum'), ('selfish', 'adam')])
def test_every_method_trains_at_its_promised_density(tiny_config, tmp_path, method, optimizer):
  tiny_config.update(method=method, optimizer=optimizer, num_epochs=2, max_steps_per_epoch=3,
                     update_every=1, update_end_fraction=0.5, log_every=3)
  if optimizer == 'adam':
    tiny_config.lr = 3e-3
  final = train_and_evaluate(tiny_config, str(tmp_path))
  epochs = _epoch_records(str(tmp_path))
  assert len(epochs) == 2 and all(np.isfinite(r['val_ppl']) for r in epochs)
  # Selfish, SET, RigL, static keep every matrix's count, SNFS and DSR the total,
  # GMP prunes from dense to the target by mid-training.
  assert final['density'] == pytest.approx(0.33, abs=2e-4)
  assert epochs[0]['density'] == pytest.approx(0.33, abs=2e-4)
  # The logged rates are the ones the method uses: RigL's cosine reaches 0 at the last
  # update (step 3), the others' decays to 0.005 at the end (step 6); GMP logs its density.
  logged = {k: [r.get(k) for r in epochs] for k in ('death_rate', 'target_density')}
  expected = {'static': [None, None], 'rigl': [0.0, 0.0], 'gmp': [None, None]}.get(
      method, [pytest.approx(0.005 + (0.5 - 0.005) * 0.5), pytest.approx(0.005)])
  assert logged['death_rate'] == expected
  assert logged['target_density'] == ([pytest.approx(0.33), pytest.approx(0.33)]
                                      if method == 'gmp' else [None, None])


def test_compare_runner_writes_the_table_and_skips_finished_runs(text_corpus_dir, tmp_path):
  command = [sys.executable, '-m', 'experiments.compare',
             '--config=experiments/configs/ptb_lstm_small.py', f'--workdir={tmp_path}',
             '--methods=dense,snfs', '--optimizers=sgd', '--seeds=1,2',
             '--config.dataset=text', f'--config.data_dir={text_corpus_dir}',
             '--config.download=False', '--config.emsize=16', '--config.nhid=16',
             '--config.batch_size=4',
             '--config.eval_batch_size=64', '--config.bptt=5', '--config.lr=5',
             '--config.num_epochs=1', '--config.max_steps_per_epoch=3', '--lrs=momentum:1.0']
  env = {**os.environ, 'PYTHONPATH': ROOT}
  first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = json.loads((tmp_path / 'results.json').read_text())
  assert [(r['method'], r['optimizer'], r['seeds']) for r in rows] == [
      ('dense', 'sgd', [1, 2]), ('snfs', 'sgd', [1, 2])]
  assert rows[1]['optimizer_used'] == 'momentum' and rows[1]['lr'] == 1.0
  # SNFS needs dense gradients every step: 2/3 of a sparse step plus 1/3 of a dense one.
  assert rows[0]['train_flops'] == 1.0 and 0.3 < rows[1]['train_flops'] < 0.6
  assert rows[1]['params'] < rows[0]['params']
  assert rows[1]['test_ppl'][1] > 0  # std over two seeds
  table = (tmp_path / 'results.md').read_text()
  assert '| dense | sgd |' in table and '| snfs | sgd (momentum) |' in table
  assert (tmp_path / 'val_ppl.png').stat().st_size > 1000
  # The terminal shows the sweep, not the cells' progress; each cell's lines are in its log.
  terminal = first.stderr.splitlines()
  assert any('sweep: 1/4 cells done (test ppl: dense/sgd/1 ' in l and 'running snfs/sgd/1; 2 left'
             in l for l in terminal), terminal
  assert not [l for l in terminal if '| epoch ' in l or '| end of epoch' in l], terminal
  log = (tmp_path / 'dense-sgd-seed2' / 'train.log').read_text()
  assert '| end of epoch   1 |' in log and '| end of training |' in log
  stamp = (tmp_path / 'snfs-sgd-seed1' / 'metrics.jsonl').stat().st_mtime
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0
  assert (tmp_path / 'snfs-sgd-seed1' / 'metrics.jsonl').stat().st_mtime == stamp


def test_diverging_run_stops_naming_the_step_and_keeps_its_checkpoints(reference, tmp_path,
                                                                        monkeypatch):
  from selfish_jax.errors import TrainingDiverged
  config, _, reference_final = reference
  real_train_step = SparseTraining.train_step

  def poisoned_train_step(self, grad_fn):
    train_step = real_train_step(self, grad_fn)

    def step(state, window, *args):  # from step 12 on (epoch 2) the weights and loss are NaN
      state, loss = train_step(state, window, *args)
      bad = state.step >= 12
      params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), state.params)
      return state.replace(params=params), jnp.where(bad, jnp.nan, loss)

    return step

  monkeypatch.setattr(SparseTraining, 'train_step', poisoned_train_step)
  with pytest.raises(TrainingDiverged) as error:
    train_and_evaluate(config, str(tmp_path))
  assert str(error.value).startswith(
      f'training diverged: the training loss is nan at step 12; the checkpoint of step 10 and '
      f'the best weights in {tmp_path} are kept unchanged')
  # The two latest checkpoints are kept (the older is the fallback); the best weights are
  # named by the step whose validation they won (the end of epoch 1).
  assert sorted(os.listdir(tmp_path / 'checkpoints'), key=int) == ['8', '10']
  assert os.listdir(tmp_path / 'best') == ['10']
  assert all(np.isfinite(r['loss']) for r in metrics_lib.read_records(
      str(tmp_path / 'metrics.jsonl')) if 'loss' in r)
  # What was kept is intact: resuming from it gives the run that never diverged.
  monkeypatch.setattr(SparseTraining, 'train_step', real_train_step)
  assert train_and_evaluate(config, str(tmp_path)) == reference_final


def test_diverging_cli_run_exits_with_one_error_line(text_corpus_dir, tmp_path):
  result = subprocess.run(_cli(tmp_path, text_corpus_dir, '--config.lr=1e30'), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 1
  # Besides absl's log lines ("I1124 16:22:27.12 ..."), stderr holds the error alone.
  errors = [line for line in result.stderr.splitlines() if not re.match(r'[IWEF]\d{4} ', line)]
  assert len(errors) == 1 and errors[0].startswith(
      'error: training diverged: the training loss is nan at step '), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not os.listdir(tmp_path / 'checkpoints')  # nothing of the diverged run saved


@pytest.mark.parametrize('optimizer', ['asgd', 'sgd'])
def test_forked_continuation_equals_the_run_trained_from_scratch(reference, tmp_path, optimizer,
                                                                  monkeypatch):
  # The reference (snt_asgd) switched at the end of epoch 2: asgd continues from
  # there switched on, sgd with the topology update the source skipped.
  from selfish_jax.training.language_modelling import LanguageModelling
  config, reference_dir, _ = reference
  config = config.copy_and_resolve_references()
  config.optimizer = optimizer
  scratch = train_and_evaluate(config, str(tmp_path / 'scratch'))
  trained, real_train_step = [], LanguageModelling.train_step
  monkeypatch.setattr(LanguageModelling, 'train_step', lambda self, state, batch: (
      trained.append(1), real_train_step(self, state, batch))[1])
  forked = train_and_evaluate(config, str(tmp_path / 'forked'),
                              start=ContinuationAtSwitch(str(reference_dir), config))
  assert len(trained) == 10  # epoch 3 alone: epochs 1 and 2 are the reference's
  assert forked == scratch
  timing = ('epoch_time_s', 'train_tokens_per_s', 'ms_per_step', 'tokens_per_s')
  records = {run: [{k: v for k, v in r.items() if k not in timing}
                   for r in metrics_lib.read_records(str(tmp_path / run / 'metrics.jsonl'))]
             for run in ('scratch', 'forked')}
  assert records['forked'] == records['scratch']
  assert [r['optimizer'] for r in _epoch_records(str(tmp_path / 'forked'))] == (
      ['sgd', 'sgd', 'asgd'] if optimizer == 'asgd' else ['sgd', 'sgd', 'sgd'])


def test_fork_refuses_a_different_config_or_a_run_that_never_switched(reference, tmp_path):
  from selfish_jax.errors import ConfigError
  config, reference_dir, _ = reference
  config = config.copy_and_resolve_references()
  fork = lambda source, path: train_and_evaluate(
      config, str(tmp_path / path), start=ContinuationAtSwitch(str(source), config))
  config.update(optimizer='sgd', density=0.5)
  with pytest.raises(ConfigError, match='its config differs in density'):
    fork(reference_dir, 'a')
  config.update(density=0.33, optimizer='adam')
  with pytest.raises(ConfigError, match="'adam' has SGD-phase state"):
    fork(reference_dir, 'b')
  # A run of the same config that has not switched yet (nothing but its config).
  (tmp_path / 'young').mkdir()
  (tmp_path / 'young' / 'config.json').write_text((reference_dir / 'config.json').read_text())
  config.update(optimizer='sgd')
  with pytest.raises(ConfigError, match='has not switched averaging on'):
    fork(tmp_path / 'young', 'c')
