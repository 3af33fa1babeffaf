"""Multi-process runs through the CLI: two processes on 127.0.0.1 (one CPU device
each, a shared workdir) against one process with two devices; kill -9 and
resume; a process dying; processes that do not share the workdir; a sweep on
two processes with its workdir in a (fake) Cloud Storage bucket."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

import fake_gcs
from experiments import cli
from selfish_jax.training import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
TIMING = ('epoch_time_s', 'train_tokens_per_s', 'ms_per_step', 'tokens_per_s')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


MAIN = ('-m', 'experiments.main')


def _args(workdir, data_dir, steps=10):
  """experiments.main's flags of a 2-epoch run."""
  return ['--config=experiments/configs/ptb_lstm_small.py',
          f'--workdir={workdir}', '--config.dataset=text', f'--config.data_dir={data_dir}',
          '--config.download=False', '--config.emsize=16', '--config.nhid=16',
          '--config.batch_size=4', '--config.eval_batch_size=16', '--config.bptt=5',
          '--config.lr=5', '--config.num_epochs=2', f'--config.max_steps_per_epoch={steps}',
          '--config.log_every=1', '--config.checkpoint_every_steps=4']


class Process:
  """One process of a run, its stderr in a file (a pipe left unread would block it)."""

  def __init__(self, args, log, env=None):
    self.log = log
    with open(log, 'w') as f:
      self.popen = subprocess.Popen(args, cwd=ROOT, env=env or ENV, stdout=subprocess.DEVNULL,
                                    stderr=f)

  def finish(self, timeout=600) -> tuple[int, str]:
    """``(exit status, stderr)`` once it ends (within ``timeout`` seconds)."""
    self.popen.wait(timeout=timeout)
    return self.popen.returncode, open(self.log).read()


# experiments.main, each process SIGKILLing itself right after training step $KILL_AT_STEP.
_KILLED_AT_A_STEP = """
import os, runpy, signal, sys
from selfish_jax.training import preemption
reached = preemption.StopWatch.reached
def reached_or_killed(self, step):
  if step == int(os.environ['KILL_AT_STEP']):
    os.kill(os.getpid(), signal.SIGKILL)
  return reached(self, step)
preemption.StopWatch.reached = reached_or_killed
sys.argv[0] = 'experiments.main'
runpy.run_module('experiments.main', run_name='__main__', alter_sys=True)
"""


def _start_processes(workdirs, data_dir, steps=10, extra=(), kill_at_step=None):
  port = _free_port()
  python = (sys.executable, *MAIN) if kill_at_step is None else (
      sys.executable, '-c', _KILLED_AT_A_STEP)
  env = ENV if kill_at_step is None else {**ENV, 'KILL_AT_STEP': str(kill_at_step)}
  return [Process([*python, *_args(workdir, data_dir, steps), '--distributed',
                   f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                   f'--process_id={i}', *extra], f'{workdir}.{i}.{port}.log', env)
          for i, workdir in enumerate(workdirs)]


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _records(workdir):
  return _without_timing(metrics_lib.read_records(str(workdir / 'metrics.jsonl')))


def _wait_for_step(workdir, step, processes, timeout=240):
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + timeout
  while time.time() < deadline:
    if metrics.exists() and any(r.get('step', 0) >= step
                                for r in metrics_lib.read_records(str(metrics))):
      return
    assert all(p.popen.poll() is None for p in processes), 'a process ended early'
    time.sleep(0.05)
  raise TimeoutError(f'no step {step} in {timeout} s')


@pytest.fixture(scope='module')
def one_process_two_devices(text_corpus_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('single')
  done = subprocess.run([sys.executable, *MAIN, *_args(workdir, text_corpus_dir)], cwd=ROOT,
                        env={**ENV, 'XLA_FLAGS': ' '.join([  # the same compiler options as the
                            ENV.get('XLA_FLAGS', ''),      # processes below, and 2 devices
                            '--xla_force_host_platform_device_count=2'])},
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return _records(workdir)


def test_two_processes_train_as_one_process_with_two_devices(one_process_two_devices,
                                                             text_corpus_dir, tmp_path):
  processes = _start_processes([tmp_path / 'run'] * 2, text_corpus_dir)
  for p in processes:
    status, stderr = p.finish()
    assert status == 0, stderr[-3000:]
  assert _records(tmp_path / 'run') == one_process_two_devices  # every loss, bit for bit
  assert 'test_ppl' in one_process_two_devices[-1]


def test_killed_processes_resume_to_the_same_run(one_process_two_devices, text_corpus_dir,
                                                 tmp_path):
  workdir = tmp_path / 'run'
  # Both processes kill -9 themselves right after step 15 (epoch 2, past its
  # checkpoint at step 14): a mid-run kill at a chosen step, not a race.
  for p in _start_processes([workdir] * 2, text_corpus_dir, kill_at_step=15):
    status, stderr = p.finish()
    assert status == -signal.SIGKILL, stderr[-3000:]
  assert max(r['step'] for r in _records(workdir)) == 15
  processes = _start_processes([workdir] * 2, text_corpus_dir)
  for p in processes:
    status, stderr = p.finish()
    assert status == 0, stderr[-3000:]
  assert 'Resumed from' in stderr and 'at step 14 (epoch 2, window 4)' in stderr
  final = _records(workdir)[-1]
  assert final == one_process_two_devices[-1]


def test_a_dying_process_stops_the_other_with_one_line(text_corpus_dir, tmp_path):
  # Killed inside a checkpoint's barrier, a process is noticed only when its
  # heartbeats stop counting: 100 s by default, 20 s here.
  processes = _start_processes([tmp_path / 'run'] * 2, text_corpus_dir, steps=2000,
                               extra=['--heartbeat_timeout=20'])
  _wait_for_step(tmp_path / 'run', 20, processes)
  processes[1].popen.send_signal(signal.SIGKILL)
  killed = time.time()
  status, stderr = processes[0].finish(timeout=120)
  assert time.time() - killed < 60
  assert status == 1, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: process 0 of 2 stops: a collective with the other processes '
                         'failed'), stderr[-3000:]


def _peer_heartbeat_lost_in_a_checkpoint_barrier():
  # What orbax raised in CI when the peer was killed during its async-write barrier.
  try:
    raise jax.errors.JaxRuntimeError('DEADLINE_EXCEEDED: Barrier failed\nTask 1 heartbeat timeout.')
  except jax.errors.JaxRuntimeError as e:
    raise TimeoutError('Timed out while waiting for async_write_complete barrier.') from e


@pytest.mark.parametrize('train, line', [
    (_peer_heartbeat_lost_in_a_checkpoint_barrier, 'stops: a collective with the other processes '
     'failed (DEADLINE_EXCEEDED: Barrier failed); the checkpoints in the workdir are kept'),
    (lambda: 1 / 0, 'failed (traceback above)'),
])
def test_a_failure_is_told_by_its_cause(monkeypatch, capsys, train, line):
  def exit_with(message):
    raise SystemExit(str(message))
  monkeypatch.setattr(cli, 'fail_now', exit_with)
  with pytest.raises(SystemExit) as stopped:
    cli.run_distributed(train)
  assert str(stopped.value).startswith(f'process 0 of 1 {line}')
  assert ('Traceback' in capsys.readouterr().err) == line.endswith('(traceback above)')


def test_processes_that_do_not_share_the_workdir_stop_with_one_line(text_corpus_dir, tmp_path):
  # The same path on two hosts' own disks: here, two folders.
  processes = _start_processes([tmp_path / 'host0', tmp_path / 'host1'], text_corpus_dir)
  for p in processes:
    status, stderr = p.finish(timeout=120)
    assert status == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(
        "error: process(es) [1] do not see"), stderr[-3000:]
    assert 'need one workdir on storage they all share' in stderr


def test_a_sweep_runs_on_two_processes_in_a_bucket(one_process_two_devices, gcs,
                                                   text_corpus_dir, tmp_path):
  # A pod's sweep: its workdir on gs://, checkpoints written by both processes.
  port = _free_port()
  config_args = [a for a in _args(tmp_path, text_corpus_dir) if a.startswith('--config')]
  sweep = f'{tmp_path.name}/sweep'
  processes = [Process([sys.executable, '-m', 'experiments.compare', *config_args,
                        f'--workdir=gs://{fake_gcs.BUCKET}/{sweep}', '--methods=selfish',
                        '--optimizers=snt_asgd', '--distributed',
                        f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                        f'--process_id={i}'], f'{tmp_path}/sweep.{i}.log', {**ENV, **gcs.env})
               for i in range(2)]
  for p in processes:
    status, stderr = p.finish()
    assert status == 0, stderr[-3000:]
  cell = f'{sweep}/selfish-snt_asgd-seed1111'
  assert _without_timing(gcs.metrics(cell)) == one_process_two_devices  # the sweep's cell is the same run
  assert '| selfish | snt_asgd |' in gcs.read(f'{sweep}/results.md')
  assert 'Start: lstm language model' in gcs.read(f'{cell}/train.log')
  assert f'{cell}/checkpoints/20/commit_success.txt' in gcs.names(f'{cell}/checkpoints/')
