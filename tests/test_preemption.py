"""A workdir survives every kill point: through the CLI, a run killed (kill -9),
preempted (SIGTERM) or interrupted (Ctrl-C) at each point where it writes
resumes to the uninterrupted run's records, on a local workdir and on a
``gs://`` one (a fake Cloud Storage server on 127.0.0.1).

Each fault is injected at a chosen call in the run's own process (the
``_FAULTY_MAIN`` wrapper patches the function it names), never by timing.
One chain of runs walks every point: each run resumes from what the one
before left and dies at the next point, so a resume after a resume is
tested too.
"""

import os
import signal
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

import fake_gcs
from experiments.configs import ptb_lstm_small
from selfish_jax.training import metrics as metrics_lib
from selfish_jax.training.language_modelling import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': ROOT}
TIMING = ('ms_per_step', 'tokens_per_s', 'epoch_time_s', 'train_tokens_per_s')


def _overrides(data_dir):
  """A run of 2 epochs of 4 steps, a progress record every 3 steps (so a stop
  at step 2 falls inside an interval), averaging switched on after epoch 1."""
  return dict(dataset='text', data_dir=str(data_dir), download=False, emsize=16, nhid=16,
              batch_size=4, eval_batch_size=16, bptt=5, lr=5.0, num_epochs=2,
              max_steps_per_epoch=4, log_every=3, asgd_start_epoch=2, growth='gradient')


def _cli(workdir, data_dir, python):
  return [*python, '--config=experiments/configs/ptb_lstm_small.py', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in _overrides(data_dir).items())]


# Runs experiments.main with the fault that $FAULT names, as POINT:ARGUMENT:
#   after_record:KIND   kill -9 right after the first record of KIND is written
#   during_record:KIND  kill -9 while the first record of KIND is written (on a
#                       disk half its line is written; an upload is all or nothing)
#   after:METHOD        kill -9 right after Checkpoints.METHOD returns
#   during_checkpoint:  kill -9 when the first checkpoints/<step> is complete but not committed
#   signal:NAME:STEP    the process sends itself SIGNAME after training step STEP
#   test_signal:NAME    the process sends itself SIGNAME as the final test starts
_FAULTY_MAIN = r'''
import os, runpy, signal, sys
point, argument, *more = os.environ['FAULT'].split(':')
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
from selfish_jax import storage
from selfish_jax.training import checkpoint, language_modelling, metrics, preemption
if point in ('after_record', 'during_record'):
  write = metrics.MetricWriter.write
  def faulty_write(self, record):
    if record.get('kind') != argument:
      return write(self, record)
    if point == 'during_record':
      if not storage.is_object_store(self.path):
        with open(self.path, 'a') as f:
          f.write(__import__('json').dumps(record)[:40])
      die()
    write(self, record)
    die()
  metrics.MetricWriter.write = faulty_write
elif point == 'after':
  method = getattr(checkpoint.Checkpoints, argument)
  def faulty(self, *args, **kwargs):
    method(self, *args, **kwargs)
    die()
  setattr(checkpoint.Checkpoints, argument, faulty)
elif point == 'during_checkpoint':
  from orbax.checkpoint._src.path import atomicity
  def patch(cls):
    finalize = cls.finalize
    async def faulty_finalize(self, *args, **kwargs):
      if self._final_path.parent.name == 'checkpoints':
        die()
      return await finalize(self, *args, **kwargs)
    cls.finalize = faulty_finalize
  patch(atomicity.AtomicRenameTemporaryPath)
  patch(atomicity.CommitFileTemporaryPath)
elif point == 'signal':
  reached = preemption.StopWatch.reached
  def signalled(self, step):
    if step == int(more[0]):
      os.kill(os.getpid(), getattr(signal, 'SIG' + argument))
    return reached(self, step)
  preemption.StopWatch.reached = signalled
elif point == 'test_signal':
  test = language_modelling.LanguageModelling.test
  def signalled_test(self, weights):
    os.kill(os.getpid(), getattr(signal, 'SIG' + argument))
    return test(self, weights)
  language_modelling.LanguageModelling.test = signalled_test
sys.argv[0] = 'experiments.main'
runpy.run_module('experiments.main', run_name='__main__', alter_sys=True)
'''


class _LocalDisk:
  """A workdir on the local disk, read with the library's own readers."""
  env = {}

  def __init__(self, tmp_path):
    self.root = tmp_path

  def workdir(self, name):
    return str(self.root / name)

  def records(self, workdir):
    return metrics_lib.read_records(workdir)

  def text(self, workdir, name):
    path = os.path.join(workdir, name)
    return open(path).read() if os.path.exists(path) else None

  def entries(self, workdir, folder):
    """The committed steps of ``workdir/folder`` (checkpoints, best, switch)."""
    path = os.path.join(workdir, folder)
    return ocp.CheckpointManager(path).all_steps() if os.path.isdir(path) else []


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

  def text(self, workdir, name):
    return self.gcs.read(f'{self._object(workdir)}/{name}')

  def entries(self, workdir, folder):
    # On an object store orbax writes a step's folder (checkpoints/N/...) in
    # place and marks it complete with commit_success.txt, written last.
    prefix = f'{self._object(workdir)}/{folder}/'
    return sorted(int(name[len(prefix):].split('/')[0]) for name in self.gcs.names(prefix)
                  if name.count('/') == prefix.count('/') + 1
                  and name.endswith('/commit_success.txt'))


@pytest.fixture(params=['local', 'gs'])
def storage(request, tmp_path):
  return _LocalDisk(tmp_path) if request.param == 'local' else _CloudStorage(
      request.getfixturevalue('gcs'), tmp_path.name)


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_every_kill_point_resumes_to_the_uninterrupted_records(storage, text_corpus_dir,
                                                              tmp_path):
  # The uninterrupted run, through the library on a local disk: the command
  # line trains the library's run, faults or none.
  config = ptb_lstm_small.get_config()
  config.update(**_overrides(text_corpus_dir))
  whole = tmp_path / 'whole'
  train_and_evaluate(config, str(whole))
  expected = _without_timing(metrics_lib.read_records(str(whole)))
  assert [r['step'] for r in expected] == [3, 4, 4, 7, 8, 8, 8]  # train, epoch, ..., final
  env = {**ENV, **storage.env}

  workdir = storage.workdir('faulty')
  log = tmp_path / 'faulty.log'

  def run(fault):
    # stderr goes to a file: a pipe read only at the end could fill up and block the run.
    with open(log, 'w') as stderr:
      finished = subprocess.run(_cli(workdir, text_corpus_dir, (sys.executable, '-c', _FAULTY_MAIN)),
                                cwd=ROOT, env={**env, 'FAULT': fault},
                                stdout=subprocess.DEVNULL, stderr=stderr, timeout=600)
    return finished.returncode, log.read_text()

  # Killed after the first record, before any checkpoint: the rerun starts the
  # records over instead of appending to them...
  code, _ = run('after_record:train')
  assert code == -signal.SIGKILL and len(storage.records(workdir)) == 1
  # ...and is preempted inside the interval of steps 1-3: the state of step 2
  # (its losses of the interval included) is saved, with one line.
  code, stderr = run('signal:TERM:2')
  assert code == 143, stderr[-2000:]
  assert 'Start: ' in stderr and storage.records(workdir) == []
  assert stderr.strip().splitlines()[-1] == (
      f'preempted: the state of step 2 (epoch 1, window 2 of 4) is saved in {workdir}; run the '
      'same command to resume')
  assert 'Traceback' not in stderr
  # Every point of epoch 1's end, which commits at the checkpoint of step 4:
  # each rerun resumes from step 2 and drops what the last one wrote for step 4.
  code, _ = run('after:save_best')
  assert code == -signal.SIGKILL and storage.entries(workdir, 'best') == [4]
  code, stderr = run('during_record:epoch')
  assert code == -signal.SIGKILL and 'Discarding the best weights of step 4' in stderr
  code, _ = run('after:save_switch')
  assert code == -signal.SIGKILL and storage.entries(workdir, 'switch') == [4]
  code, stderr = run('during_checkpoint:')
  assert code == -signal.SIGKILL and 'Discarding the switch checkpoint of step 4' in stderr
  assert storage.entries(workdir, 'checkpoints') == [2]
  code, stderr = run('after:save_latest')
  assert code == -signal.SIGKILL and 'at step 2 (epoch 1, window 2)' in stderr
  assert storage.entries(workdir, 'checkpoints') == [2, 4]
  # Ctrl-C in epoch 2 saves at the next step and says so...
  code, stderr = run('signal:INT:6')
  assert code == 130, stderr[-2000:]
  assert 'at step 4 (epoch 2, window 0)' in stderr
  assert stderr.strip().splitlines()[-1].startswith(
      'interrupted: the state of step 6 (epoch 2, window 2 of 4) is saved in ')
  # ...and SIGTERM during the final test lets the test finish: the run is complete.
  code, stderr = run('test_signal:TERM')
  assert code == 0, stderr[-2000:]
  assert 'SIGTERM arrived after training; the test finished and the run is complete' in stderr

  assert _without_timing(storage.records(workdir)) == expected
  assert storage.entries(workdir, 'checkpoints') == [6, 8]
  assert storage.entries(workdir, 'best')[-1] == _LocalDisk(tmp_path).entries(whole, 'best')[-1]
  assert storage.text(workdir, 'lock') is None  # released at the end
