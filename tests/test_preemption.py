"""Preemption through the CLI: SIGTERM mid-epoch saves at a step, exits by itself,
and the run resumes to the uninterrupted run's numbers, on a local workdir and
on a ``gs://`` one (a fake Cloud Storage server on 127.0.0.1)."""

import os
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

import fake_gcs
from selfish_jax.training import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': ROOT}


def _cli(workdir, data_dir, *overrides):
  """The run's command; ``overrides`` (``--config.KEY=VALUE``) come last and win."""
  return [sys.executable, '-m', 'experiments.main',
          '--config=experiments/configs/ptb_lstm_small.py', f'--workdir={workdir}',
          '--config.dataset=text', f'--config.data_dir={data_dir}', '--config.download=False',
          '--config.emsize=16', '--config.nhid=16', '--config.batch_size=4',
          '--config.eval_batch_size=16', '--config.bptt=5', '--config.lr=5',
          '--config.num_epochs=2', '--config.max_steps_per_epoch=100', '--config.log_every=5',
          '--config.growth=gradient', *overrides]


class _LocalDisk:
  """A workdir on the local disk, read with the library's own readers."""
  env = {}

  def __init__(self, tmp_path):
    self.root = tmp_path

  def workdir(self, name):
    return str(self.root / name)

  def records(self, workdir):
    return metrics_lib.read_records(workdir)

  def latest_checkpoint(self, workdir):
    return ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')).latest_step()


class _CloudStorage:
  """A ``gs://`` workdir on the fake server, read over its HTTP API (no client cache)."""

  def __init__(self, gcs, prefix):
    self.gcs, self.env, self.prefix = gcs, gcs.env, prefix

  def workdir(self, name):
    return f'gs://{fake_gcs.BUCKET}/{self.prefix}/{name}'

  def _object(self, workdir):
    return workdir.removeprefix(f'gs://{fake_gcs.BUCKET}/')

  def records(self, workdir):
    return self.gcs.metrics(self._object(workdir))

  def checkpoint_objects(self, workdir):
    folder = self._object(workdir) + '/checkpoints/'
    return [name[len(folder):] for name in self.gcs.names(folder)]

  def latest_checkpoint(self, workdir):
    # On an object store orbax writes a step's folder (checkpoints/N/...) in
    # place and marks it complete with commit_success.txt, written last.
    return max((int(name.split('/')[0]) for name in self.checkpoint_objects(workdir)
                if name.endswith('/commit_success.txt')), default=None)


@pytest.fixture(params=['local', 'gs'])
def storage(request, tmp_path):
  return _LocalDisk(tmp_path) if request.param == 'local' else _CloudStorage(
      request.getfixturevalue('gcs'), tmp_path.name)


def test_sigterm_saves_mid_epoch_exits_and_resumes_to_the_same_result(
    storage, text_corpus_dir, tmp_path):
  whole = subprocess.run(_cli(tmp_path / 'whole', text_corpus_dir), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-2000:]
  expected = metrics_lib.final_record(str(tmp_path / 'whole'))['test_ppl']

  workdir = storage.workdir('preempted')
  env = {**ENV, **storage.env}
  # stderr goes to a file: a pipe read only at the end could fill up and block the run.
  log = tmp_path / 'preempted.log'
  with open(log, 'w') as stderr_file:
    process = subprocess.Popen(_cli(workdir, text_corpus_dir), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=stderr_file)
  deadline = time.time() + 300
  while time.time() < deadline:  # into the second epoch (100 steps each)
    if any(r.get('step', 0) > 110 for r in storage.records(workdir)):
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  sent = time.time()
  process.wait(timeout=60)  # exits by itself
  assert time.time() - sent < 60
  stderr = log.read_text()
  assert process.returncode == 143, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('preempted: the state of step ') and 'Traceback' not in stderr, last
  saved = storage.latest_checkpoint(workdir)
  assert 110 < saved < 200, saved  # a step inside epoch 2, not its end
  assert f'step {saved} (epoch 2, window {saved - 100} of 100)' in last

  resumed = subprocess.run(_cli(workdir, text_corpus_dir), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'at step {saved}' in resumed.stderr  # 'Resumed from ... at step N'
  assert storage.records(workdir)[-1]['test_ppl'] == expected


def test_a_kill_during_an_upload_resumes_from_the_last_complete_checkpoint(
    gcs, text_corpus_dir, tmp_path):
  # Preemption without notice while a checkpoint is half uploaded to the bucket.
  storage = _CloudStorage(gcs, tmp_path.name)
  env = {**ENV, **gcs.env}
  every_step = ('--config.max_steps_per_epoch=3', '--config.checkpoint_every_steps=1',
                '--config.log_every=1')
  whole = subprocess.run(_cli(storage.workdir('whole'), text_corpus_dir, *every_step), cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-2000:]

  workdir = storage.workdir('killed')
  process = subprocess.Popen(_cli(workdir, text_corpus_dir, *every_step), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:  # step 2's folder has objects, but no commit mark yet
    objects = storage.checkpoint_objects(workdir)
    if any(name.startswith('2/') for name in objects) and '2/commit_success.txt' not in objects:
      break
    assert process.poll() is None, 'the run ended before step 2 was caught mid-upload'
    time.sleep(0.005)
  process.kill()
  process.wait()
  saved = storage.latest_checkpoint(workdir)
  assert saved == 1, storage.checkpoint_objects(workdir)  # step 2 is there, incomplete

  resumed = subprocess.run(_cli(workdir, text_corpus_dir, *every_step), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'at step 1 ' in resumed.stderr  # 'Resumed from ... at step 1 (epoch 1, window 1)'
  # Every record, the resumed part included, is the uninterrupted run's.
  numbers = lambda run: [(r['step'], r.get('loss'), r.get('val_loss'), r.get('test_ppl'))
                         for r in storage.records(run)]
  assert numbers(workdir) == numbers(storage.workdir('whole'))
  assert numbers(workdir)[-1][-1] is not None  # through the test
