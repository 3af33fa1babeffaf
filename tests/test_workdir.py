"""What a workdir does with damage, a second run, divergence and bad input:
each is refused or recovered with one line, and what was saved stays.

The kill points and signals are walked through the CLI in test_preemption.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import make_tiny_config, write_text_corpus
from selfish_jax.errors import ConfigError, DataError, TrainingDiverged, WorkdirError
from selfish_jax.training import metrics as metrics_lib
from selfish_jax.training.checkpoint import Checkpoints
from selfish_jax.training.core import SparseTraining
from selfish_jax.training.language_modelling import train_and_evaluate
from selfish_jax.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('ms_per_step', 'tokens_per_s', 'epoch_time_s', 'train_tokens_per_s')


def _records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in metrics_lib.read_records(str(workdir))]


@pytest.fixture(scope='module')
def finished(text_corpus_dir, tmp_path_factory):
  """``(config, workdir, final record)`` of a finished run: 2 epochs of 4 steps,
  so it keeps the checkpoints of steps 4 and 8."""
  config = make_tiny_config(text_corpus_dir, dataset='text')
  config.update(num_epochs=2, max_steps_per_epoch=4, log_every=2)
  workdir = tmp_path_factory.mktemp('finished')
  return config, workdir, train_and_evaluate(config, str(workdir))


def _copy(finished, tmp_path):
  config, workdir, final = finished
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  return config, copy, final


def _data_files(folder):
  """The array data files of a checkpoint folder."""
  for directory, _, names in os.walk(folder):
    parent, last = os.path.split(directory)
    if last == 'd' and not os.path.basename(parent).startswith('ocdbt.process'):
      yield from (os.path.join(directory, name) for name in names)


def _damage(folder):
  """Cuts every data file of a checkpoint folder in half."""
  for path in _data_files(folder):
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])


def _overwrite(folder):
  """Zeroes the second half of every data file of a checkpoint folder (the
  sizes stay: the reads start, then fail)."""
  for path in _data_files(folder):
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      f.seek(size // 2)
      f.write(bytes(size - size // 2))


def test_an_unreadable_checkpoint_falls_back_to_the_one_before(finished, tmp_path, caplog):
  config, workdir, final = _copy(finished, tmp_path)
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['4', '8']
  _damage(workdir / 'checkpoints' / '8')
  with caplog.at_level('WARNING'):
    assert train_and_evaluate(config, str(workdir)) == final  # epoch 2 trained again
  moved = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert len(moved) == 1 and moved[0].startswith(
      f'The checkpoint of step 8 in {workdir}/checkpoints cannot be read (ValueError: ')
  assert moved[0].endswith('and the run resumes from the checkpoint of step 4.')
  [aside] = os.listdir(workdir / 'unreadable')
  assert aside.startswith('checkpoints-8-')
  assert _records(workdir) == _records(finished[1])


_RESUME = """
import sys
from selfish_jax import config as config_lib
from selfish_jax.training.language_modelling import train_and_evaluate
from selfish_jax.training.workdir import read_config
config = config_lib.default_config()
config.update(read_config(sys.argv[1]))  # the run's own config, as a rerun gives it
train_and_evaluate(config, sys.argv[1])
"""


def test_a_failed_read_leaves_nothing_on_the_terminal(finished, tmp_path):
  # The read's other arrays finish after it failed; each used to print a
  # traceback (thousands of lines) at any moment up to the exit.
  _, workdir, _ = _copy(finished, tmp_path)
  _overwrite(workdir / 'checkpoints' / '8')
  done = subprocess.run([sys.executable, '-c', _RESUME, str(workdir)], cwd=ROOT,
                        env={**os.environ, 'PYTHONPATH': ROOT},
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'cannot be read' in done.stderr
  for leftover in ('Traceback', 'never retrieved', 'never awaited', 'Event loop is closed'):
    assert leftover not in done.stderr, done.stderr[-3000:]


def test_no_readable_checkpoint_is_one_error_naming_it(finished, tmp_path):
  config, workdir, _ = _copy(finished, tmp_path)
  for step in ('4', '8'):
    _damage(workdir / 'checkpoints' / step)
  with pytest.raises(WorkdirError, match=(
      rf'^no checkpoint in {workdir}/checkpoints can be read: the newest, '
      rf'{workdir}/checkpoints/8, fails with ValueError: ')):
    train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['4', '8']  # nothing moved


def test_damaged_records_and_config_are_one_error_or_a_warning(finished, tmp_path, caplog):
  config, workdir, final = _copy(finished, tmp_path)
  metrics_file = workdir / 'metrics.jsonl'
  good = metrics_file.read_text()
  # A kill in the middle of a write leaves a last line cut short: left out, with a warning.
  metrics_file.write_text(good + '{"kind": "train", "st')
  with caplog.at_level('WARNING'):
    assert train_and_evaluate(config, str(workdir)) == final
  assert any('its last line is cut short' in r.getMessage() for r in caplog.records)
  assert metrics_file.read_text() == good
  # Anything else unreadable is one error naming the file.
  metrics_file.write_text(good.replace('"kind": "epoch"', '"kind": epoch', 1))
  with pytest.raises(WorkdirError, match=rf'^{metrics_file} line \d+ is not a JSON record'):
    train_and_evaluate(config, str(workdir))
  metrics_file.write_text(good)
  (workdir / 'config.json').write_bytes(b'\x00\xff garbage')
  with pytest.raises(WorkdirError, match=rf"^{workdir}/config.json cannot be read "
                     r"\(UnicodeDecodeError: .*put the run's config.json back"):
    train_and_evaluate(config, str(workdir))


def test_unreadable_best_weights_are_one_error_naming_them(finished, tmp_path):
  config, workdir, _ = _copy(finished, tmp_path)
  [best] = os.listdir(workdir / 'best')
  _damage(workdir / 'best' / best)
  with pytest.raises(WorkdirError, match=rf'^the best weights {workdir}/best/{best} cannot be read'):
    train_and_evaluate(config, str(workdir))


def test_a_reader_follows_a_run_that_moves_on_while_it_reads(finished, tmp_path, monkeypatch):
  # analyze, export and generate read running runs, whose older checkpoints
  # go as newer ones come. Here the run moves on once during each read, between
  # the reader's listing and its restore: it saves a new checkpoint (a copy of
  # the newest, so the answer is known) and deletes the ones it had.
  _, workdir, _ = _copy(finished, tmp_path)
  reader = Checkpoints(str(workdir), read_only=True)
  masks, best_step, best = reader.latest_masks(), reader.best_step(), reader.restore_best(None)
  checkpoints, steps, moving = workdir / 'checkpoints', [8], [False]
  restore = ocp.CheckpointManager.restore

  def run_moves_on_then_restore(manager, step, *args, **kwargs):
    if moving[0] and step == steps[-1]:
      moving[0] = False
      steps.append(step + 4)
      shutil.copytree(checkpoints / str(step), checkpoints / str(step + 4))
      for old in os.listdir(checkpoints):
        if int(old) <= step:
          shutil.rmtree(checkpoints / old)
    return restore(manager, step, *args, **kwargs)

  def while_the_run_moves_on(read):
    moving[0] = True
    return read()

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', run_moves_on_then_restore)
  equal = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert equal(while_the_run_moves_on(reader.latest_masks), masks)
  assert while_the_run_moves_on(reader.best_step) == best_step
  assert equal(while_the_run_moves_on(lambda: reader.restore_best(None)), best)
  assert steps == [8, 12, 16, 20]  # the run moved on during each of the three reads
  reader.close()


def test_a_workdir_in_use_is_refused_naming_its_holder(tmp_path):
  lock = workdir_lib.lock_workdir(str(tmp_path))
  with pytest.raises(WorkdirError, match=rf'^{tmp_path} is in use by another run \(pid '
                     rf'{os.getpid()} on host .*, started .*\); wait for it to end'):
    workdir_lib.lock_workdir(str(tmp_path))
  lock.release()
  assert not os.path.exists(tmp_path / 'lock')  # a finished run leaves none behind
  workdir_lib.lock_workdir(str(tmp_path)).release()


_HOLD_THE_LOCK = """
import sys
from selfish_jax.training import workdir
workdir.lock_workdir(sys.argv[1])
print('locked', flush=True)
sys.stdin.read()
"""


def test_a_second_run_is_refused_and_a_killed_holder_leaves_no_lock(tiny_config, tmp_path):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_THE_LOCK, str(tmp_path)], cwd=ROOT,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == 'locked\n'
  command = [sys.executable, '-m', 'experiments.main', '--config=experiments/configs/ptb_lstm_small.py',
             f'--workdir={tmp_path}', '--config.dataset=text',
             f'--config.data_dir={tiny_config.data_dir}', '--config.download=False',
             '--config.emsize=16', '--config.nhid=16', '--config.batch_size=4',
             '--config.eval_batch_size=64', '--config.bptt=5', '--config.num_epochs=1',
             '--config.max_steps_per_epoch=2']
  refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
  assert refused.returncode == 1
  [line] = [l for l in refused.stderr.splitlines() if not re.match(r'[IWEF]\d{4} ', l)]
  assert line.startswith(f'error: {tmp_path} is in use by another run (pid {holder.pid} on host ')
  assert line.endswith('); wait for it to end, or use another workdir')
  assert sorted(os.listdir(tmp_path)) == ['lock']  # nothing of the run written
  holder.kill()  # kill -9: the kernel drops its lock
  holder.wait()
  workdir_lib.lock_workdir(str(tmp_path)).release()


def test_a_lease_on_an_object_store_refuses_a_live_holder_and_takes_over_a_dead_one(gcs,
                                                                                   tmp_path):
  workdir = f'gs://bucket/{tmp_path.name}/run'
  lock = workdir_lib.lock_workdir(workdir)
  assert gcs.names(f'{tmp_path.name}/') == [f'{tmp_path.name}/run/lock']
  with pytest.raises(WorkdirError, match=rf'in use by another run \(pid {os.getpid()} '):
    workdir_lib.lock_workdir(workdir)
  lock.release()
  assert gcs.names(f'{tmp_path.name}/') == []
  from etils import epath
  import socket
  import time
  lease = epath.Path(workdir, 'lock')
  for holder, taken in (({'host': socket.gethostname(), 'pid': 2 ** 22 + 1}, True),  # dead here
                        ({'host': 'elsewhere', 'pid': 1, 'renewed': time.time() - 1000}, True),
                        ({'host': 'elsewhere', 'pid': 1}, False)):  # renewed just now
    lease.write_text(json.dumps({'started': 'earlier', 'renewed': time.time(), **holder}))
    if taken:
      workdir_lib.lock_workdir(workdir).release()
    else:
      with pytest.raises(WorkdirError, match=r'\(pid 1 on host elsewhere, started earlier\)'):
        workdir_lib.lock_workdir(workdir)


def test_diverged_parameters_are_never_saved(tiny_config, tmp_path, monkeypatch):
  tiny_config.update(num_epochs=1, max_steps_per_epoch=4, checkpoint_every_steps=1, log_every=4)
  real_train_step = SparseTraining.train_step

  def poisoned_train_step(self, grad_fn):
    train_step = real_train_step(self, grad_fn)

    def step(state, window, *args):  # step 2's update makes every weight inf; its loss is fine
      state, loss = train_step(state, window, *args)
      params = jax.tree.map(lambda p: jnp.where(state.step >= 2, jnp.inf, p), state.params)
      return state.replace(params=params), loss

    return step

  monkeypatch.setattr(SparseTraining, 'train_step', poisoned_train_step)
  with pytest.raises(TrainingDiverged, match=(
      r'^training diverged: the parameters are not finite at step 2; the checkpoint of step 1 '
      rf'and the best weights in {tmp_path} are kept unchanged')):
    train_and_evaluate(tiny_config, str(tmp_path))
  manager = ocp.CheckpointManager(str(tmp_path / 'checkpoints'))
  assert manager.all_steps() == [1]
  kept = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(kept['params']))


@pytest.mark.parametrize('train_text,message', [
    ('', 'holds no words'),
    ('<unk> w1 w2\n', 'the train split of the text corpus in {dir} has 4 tokens: too few for '
                   'batch_size=4 (it needs at least 8)'),
])
def test_a_corpus_too_small_for_the_batch_is_one_error(tiny_config, tmp_path, train_text,
                                                       message):
  corpus = write_text_corpus(tmp_path / 'corpus', tokens=(200, 200, 200))
  (tmp_path / 'corpus' / 'train.txt').write_text(train_text)
  tiny_config.data_dir = corpus
  with pytest.raises(DataError, match=message.format(dir=corpus).replace('(', r'\(').replace(
      ')', r'\)')):
    train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  tiny_config.data_dir = write_text_corpus(tmp_path / 'small', tokens=(2_000, 50, 50))
  tiny_config.eval_batch_size = 64  # 50 tokens cannot fill 64 columns
  with pytest.raises(DataError, match=r'^the valid split .* has \d+ tokens: too few for '
                     r'eval_batch_size=64'):
    train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('key,value,message', [
    ('lr', float('nan'), 'lr must be a finite number, got nan'),
    ('weight_decay', float('inf'), 'weight_decay must be a finite number, got inf'),
    ('clip', -1.0, 'clip must be >= 0.0, got -1.0'),
    ('momentum', 1.5, 'momentum must be in [0, 1), got 1.5'),
    ('death_rate_final', 2.0, 'death_rate_final must be in [0, 1], got 2.0'),
])
def test_every_number_of_the_config_is_checked(tiny_config, tmp_path, key, value, message):
  tiny_config[key] = value
  with pytest.raises(ConfigError) as error:
    train_and_evaluate(tiny_config, str(tmp_path))
  assert str(error.value) == message
  assert not os.listdir(tmp_path)  # nothing written, so nothing refused on the next start


def _tiny_cli(workdir, data_dir):
  return [sys.executable, '-m', 'experiments.main',
          '--config=experiments/configs/ptb_lstm_small.py', f'--workdir={workdir}',
          '--config.dataset=text', f'--config.data_dir={data_dir}', '--config.download=False',
          '--config.emsize=16', '--config.nhid=16', '--config.batch_size=4',
          '--config.eval_batch_size=16', '--config.bptt=5', '--config.lr=5',
          '--config.num_epochs=2', '--config.max_steps_per_epoch=4', '--config.log_every=3']


def test_a_full_disk_stops_with_one_line_and_the_rerun_is_identical(text_corpus_dir,
                                                                     tmp_path):
  # The workdir is a tmpfs in a mount namespace of its own, half the size the
  # whole run takes: the run fills it; the rerun, with room, resumes.
  if shutil.which('unshare') is None or subprocess.run(
      ['unshare', '-m', 'true'], capture_output=True).returncode != 0:
    pytest.skip('needs unshare -m (a mount namespace) to give the run a small disk')
  env = {**os.environ, 'PYTHONPATH': ROOT}
  whole = subprocess.run(_tiny_cli(tmp_path / 'whole', text_corpus_dir), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
  assert whole.returncode == 0, whole.stderr[-2000:]
  kib = sum(-(-os.path.getsize(os.path.join(folder, name)) // 4096) * 4
            for folder, _, names in os.walk(tmp_path / 'whole') for name in names)
  disk, out = tmp_path / 'disk', tmp_path / 'out'
  disk.mkdir()
  out.mkdir()
  command = ' '.join(_tiny_cli(disk / 'run', text_corpus_dir))
  script = (f'mount -t tmpfs -o size={kib // 2}k tmpfs {disk} || exit 99\n'
            f'{command} 2>{out}/full.log; echo $? >{out}/full.status\n'
            f'mount -o remount,size=50m {disk}\n'
            f'{command} 2>{out}/rerun.log; echo $? >{out}/rerun.status\n'
            f'cp {disk}/run/metrics.jsonl {out}/\n')
  result = subprocess.run(['unshare', '-m', '--propagation', 'private', 'sh', '-c', script],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if result.returncode == 99:
    pytest.skip('cannot mount a tmpfs here')
  full = (out / 'full.log').read_text()
  assert (out / 'full.status').read_text().strip() == '1', full[-3000:]
  errors = [l for l in full.splitlines() if not re.match(r'[IW]\d{4} ', l)]
  assert len(errors) == 1 and errors[0].startswith(
      f'error: no space left to write into {disk}/run ([Errno 28] No space left on device: '), full
  assert errors[0].endswith('free some space and run the same command to resume')
  assert (out / 'rerun.status').read_text().strip() == '0', (out / 'rerun.log').read_text()
  assert _records(out) == _records(tmp_path / 'whole')
