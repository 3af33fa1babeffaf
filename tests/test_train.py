"""End-to-end training on real PTB with a tiny model: learning, switching, resuming."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from selfish_jax import optim
from selfish_jax.training import metrics as metrics_lib
from selfish_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _epoch_records(workdir):
  return [r for r in metrics_lib.read_records(os.path.join(workdir, 'metrics.jsonl'))
          if 'val_ppl' in r]


def _switch_after_first_epoch(monkeypatch):
  # Makes the NT-ASGD trigger fire after epoch 2, deterministically.
  monkeypatch.setattr(optim, 'nonmonotone_trigger', lambda losses, loss, nonmono: len(losses) == 1)


def test_selfish_training_learns_switches_and_keeps_density(tiny_config, tmp_path, monkeypatch):
  _switch_after_first_epoch(monkeypatch)
  tiny_config.max_steps_per_epoch = 25
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  records = metrics_lib.read_records(str(tmp_path / 'metrics.jsonl'))
  train_losses = [r['loss'] for r in records if 'loss' in r]
  assert train_losses[-1] < train_losses[0] - 1.0  # loss goes down
  epochs = _epoch_records(str(tmp_path))
  assert [r['epoch'] for r in epochs] == [1, 2, 3]
  assert [r['optimizer'] for r in epochs] == ['sgd', 'sgd', 'asgd']
  assert epochs[-1]['val_ppl'] < epochs[0]['val_ppl']
  assert all(r['density'] == pytest.approx(0.33, abs=1e-3) for r in epochs)
  assert set(epochs[0]['gate_density']) == {
      "['lstm_0']['input_kernel']", "['lstm_0']['recurrent_kernel']",
      "['lstm_1']['input_kernel']", "['lstm_1']['recurrent_kernel']"}
  assert all('tokens_per_s' in r for r in records if 'loss' in r)
  assert final['test_ppl'] == records[-1]['test_ppl'] and final['test_ppl'] < 3000  # uniform: 10,000
  assert os.listdir(tmp_path / 'tensorboard')


def test_dense_training_has_no_masks(tiny_config, tmp_path):
  tiny_config.method = 'dense'
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(tmp_path))
  assert _epoch_records(str(tmp_path))[0]['density'] == 1.0


class Interrupted(Exception):
  pass


def test_interrupted_run_resumes_to_identical_results(tiny_config, tmp_path, monkeypatch):
  _switch_after_first_epoch(monkeypatch)
  tiny_config.checkpoint_every_steps = 5
  tiny_config.growth = 'gradient'
  reference = train.train_and_evaluate(tiny_config, str(tmp_path / 'reference'))

  # Die at step 32 (epoch 3, after the switch, 2 steps past a mid-epoch checkpoint)...
  real_write = metrics_lib.MetricWriter.write

  def dying_write(self, record):
    real_write(self, record)
    if record.get('step') == 32 and 'loss' in record:
      raise Interrupted()

  monkeypatch.setattr(metrics_lib.MetricWriter, 'write', dying_write)
  with pytest.raises(Interrupted):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'))
  monkeypatch.setattr(metrics_lib.MetricWriter, 'write', real_write)
  # ...and start again with the same workdir.
  resumed = train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'))
  assert resumed == reference
  assert _epoch_records(str(tmp_path / 'resumed')) == [
      {**r, 'epoch_time_s': r2['epoch_time_s'], 'train_tokens_per_s': r2['train_tokens_per_s']}
      for r, r2 in zip(_epoch_records(str(tmp_path / 'reference')),
                       _epoch_records(str(tmp_path / 'resumed')))]


def _cli(workdir, *overrides):
  return [sys.executable, '-m', 'experiments.main',
          '--config=experiments/configs/ptb_lstm_small.py', f'--workdir={workdir}',
          '--config.data_dir=../shared/data', '--config.download=False', '--config.emsize=16',
          '--config.nhid=16', '--config.batch_size=4', '--config.eval_batch_size=64',
          '--config.bptt=10', '--config.lr=5', '--config.num_epochs=2',
          '--config.max_steps_per_epoch=24', '--config.log_every=1', *overrides]


def test_killed_process_resumes_to_identical_results(shared_data_dir, tmp_path):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  done = subprocess.run(_cli(tmp_path / 'a'), cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  process = subprocess.Popen(_cli(tmp_path / 'b', '--config.checkpoint_every_steps=10'),
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  metrics = tmp_path / 'b' / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline:  # kill -9 once it is past a mid-epoch checkpoint
    if metrics.exists() and any(r.get('step', 0) >= 13
                                for r in metrics_lib.read_records(str(metrics))):
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = subprocess.run(_cli(tmp_path / 'b', '--config.checkpoint_every_steps=10'), cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'Resumed from' in resumed.stderr
  final_a = metrics_lib.read_records(str(tmp_path / 'a' / 'metrics.jsonl'))[-1]
  final_b = metrics_lib.read_records(str(metrics))[-1]
  assert final_a['test_ppl'] == final_b['test_ppl']
  assert [r['val_ppl'] for r in _epoch_records(str(tmp_path / 'a'))] == [
      r['val_ppl'] for r in _epoch_records(str(tmp_path / 'b'))]


@pytest.mark.parametrize('override,message', [
    ('--config.densty=0.5', "unknown config key 'densty' (did you mean 'density'?)"),
    ('--config.density=1.5', 'density must be in (0, 1], got 1.5'),
    ('--config.method=magic', "unknown method 'magic'"),
    ('--config.data_dir=/nonexistent', 'missing data file: no train.txt or train.txt.gz'),
])
def test_user_errors_are_one_line(shared_data_dir, tmp_path, override, message):
  result = subprocess.run(_cli(tmp_path, override), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [f'error: {message}'] or (
      result.stderr.strip().splitlines()[-1].startswith(f'error: {message}'))
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


@pytest.mark.parametrize('key,value,message', [
    ('density', 0, 'density must be in (0, 1], got 0'),
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
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert str(error.value).startswith(message)
  assert not os.listdir(tmp_path)  # nothing written


def test_snfs_without_momentum_is_refused(tiny_config, tmp_path):
  from selfish_jax.errors import ConfigError
  tiny_config.update(method='snfs', optimizer='sgd')
  with pytest.raises(ConfigError, match="needs optimizer 'momentum' or 'adam'"):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_resuming_with_a_different_config_is_refused(tiny_config, tmp_path):
  saved = tiny_config.to_dict()
  saved['density'] = 0.5
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  tiny_config.log_every = 1  # harmless on its own
  from selfish_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r'different config \(density: 0.5 -> 0.33\)'):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['config.json']  # nothing else written


@pytest.mark.parametrize('method,optimizer', [
    ('static', 'sgd'), ('set', 'snt_asgd'), ('rigl', 'adam'), ('snfs', 'momentum'),
    ('dsr', 'sgd'), ('gmp', 'momentum'), ('selfish', 'adam')])
def test_every_method_trains_at_its_promised_density(tiny_config, tmp_path, method, optimizer):
  tiny_config.update(method=method, optimizer=optimizer, num_epochs=2, max_steps_per_epoch=3,
                     update_every=1, update_end_fraction=0.5, log_every=3)
  if optimizer == 'adam':
    tiny_config.lr = 3e-3
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  epochs = _epoch_records(str(tmp_path))
  assert len(epochs) == 2 and all(np.isfinite(r['val_ppl']) for r in epochs)
  # Selfish, SET, RigL, static keep every matrix's count, SNFS and DSR the total,
  # GMP prunes from dense to the target by mid-training.
  assert final['density'] == pytest.approx(0.33, abs=2e-4)
  assert epochs[0]['density'] == pytest.approx(0.33, abs=2e-4)


def test_compare_runner_writes_the_table_and_skips_finished_runs(shared_data_dir, tmp_path):
  command = [sys.executable, '-m', 'experiments.compare',
             '--config=experiments/configs/ptb_lstm_small.py', f'--workdir={tmp_path}',
             '--methods=dense,snfs', '--optimizers=sgd', '--seeds=1,2',
             f'--config.data_dir={shared_data_dir}', '--config.download=False',
             '--config.emsize=16', '--config.nhid=16', '--config.batch_size=4',
             '--config.eval_batch_size=64', '--config.bptt=10', '--config.lr=5',
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
  stamp = (tmp_path / 'snfs-sgd-seed1' / 'metrics.jsonl').stat().st_mtime
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0
  assert (tmp_path / 'snfs-sgd-seed1' / 'metrics.jsonl').stat().st_mtime == stamp


def test_epoch_records_carry_the_topology_change(tiny_config, tmp_path):
  tiny_config.num_epochs = 2
  tiny_config.max_steps_per_epoch = 3
  train.train_and_evaluate(tiny_config, str(tmp_path))
  first = _epoch_records(str(tmp_path))[0]
  assert set(first['topology_distance']) == {
      "['decoder_kernel']", "['embedding']", "['lstm_0']['input_kernel']",
      "['lstm_0']['recurrent_kernel']", "['lstm_1']['input_kernel']",
      "['lstm_1']['recurrent_kernel']"}
  # ceil(p * active) weights of each matrix moved, less the few regrown where
  # they were just removed.
  rate = first['death_rate']
  for name, distance in first['topology_distance'].items():
    assert 0.8 * rate < distance < rate + 0.01, (name, distance, rate)
