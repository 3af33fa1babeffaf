"""Preemption through the CLI: SIGTERM mid-epoch saves at a step, exits by itself,
and the run resumes to the uninterrupted run's numbers."""

import os
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp

from selfish_jax.training import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': ROOT}


def _cli(workdir, data_dir):
  return [sys.executable, '-m', 'experiments.main',
          '--config=experiments/configs/ptb_lstm_small.py', f'--workdir={workdir}',
          '--config.dataset=text', f'--config.data_dir={data_dir}', '--config.download=False',
          '--config.emsize=16', '--config.nhid=16', '--config.batch_size=4',
          '--config.eval_batch_size=16', '--config.bptt=5', '--config.lr=5',
          '--config.num_epochs=2', '--config.max_steps_per_epoch=100', '--config.log_every=5',
          '--config.growth=gradient']


def _test_ppl(workdir):
  return metrics_lib.read_records(str(workdir / 'metrics.jsonl'))[-1]['test_ppl']


def test_sigterm_saves_mid_epoch_exits_and_resumes_to_the_same_result(text_corpus_dir, tmp_path):
  whole = subprocess.run(_cli(tmp_path / 'whole', text_corpus_dir), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-2000:]

  workdir = tmp_path / 'preempted'
  process = subprocess.Popen(_cli(workdir, text_corpus_dir), cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline:  # into the second epoch (100 steps each)
    if metrics.exists() and any(r.get('step', 0) > 110
                                for r in metrics_lib.read_records(str(metrics))):
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  sent = time.time()
  _, stderr = process.communicate(timeout=60)  # exits by itself
  assert time.time() - sent < 60
  assert process.returncode == 143, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('preempted: the state of step ') and 'Traceback' not in stderr, last
  manager = ocp.CheckpointManager(str(workdir / 'checkpoints'))
  saved = manager.latest_step()
  assert 110 < saved < 200, saved  # a step inside epoch 2, not its end
  assert f'step {saved} (epoch 2, window {saved - 100} of 100)' in last

  resumed = subprocess.run(_cli(workdir, text_corpus_dir), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'at step {saved}' in resumed.stderr  # 'Resumed from ... at step N'
  assert _test_ppl(workdir) == _test_ppl(tmp_path / 'whole')
