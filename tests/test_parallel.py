"""Data parallelism through the CLI: 1 and 4 (host-platform) devices give the same run.

With ``gradient_groups`` the gradient is summed in the same order whatever the
device count, and each group draws its own dropout, so the runs agree to float
rounding (often bitwise; XLA may still compile the per-group program a little
differently for the two layouts). The runs cover dropout, topology updates and
the SNT-ASGD switch.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from selfish_jax.training import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
       'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}


def _cli(workdir, data_dir, *overrides):
  return [sys.executable, '-m', 'experiments.main',
          '--config=experiments/configs/ptb_lstm_small.py', f'--workdir={workdir}',
          '--config.dataset=text', f'--config.data_dir={data_dir}', '--config.download=False',
          '--config.emsize=16',
          '--config.nhid=16', '--config.batch_size=8', '--config.eval_batch_size=8',
          '--config.bptt=5', '--config.lr=5', '--config.num_epochs=3', '--config.max_steps_per_epoch=6',
          '--config.log_every=2', '--config.gradient_groups=4', '--config.asgd_start_epoch=3',
          *overrides]


def test_device_counts_give_the_same_run_through_the_cli(text_corpus_dir, tmp_path):
  runs = {}
  for n in (1, 4):
    done = subprocess.run(_cli(tmp_path / str(n), text_corpus_dir, f'--config.num_devices={n}'),
                          cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs[n] = metrics.read_records(str(tmp_path / str(n) / 'metrics.jsonl'))
  one = runs[1]
  epochs = [r for r in one if 'val_loss' in r]
  assert [r['optimizer'] for r in epochs] == ['sgd', 'sgd', 'asgd']
  assert all(r['topology_distance'] for r in epochs[:1])  # the topology moved after epoch 1
  for n in (4,):
    other = runs[n]
    np.testing.assert_allclose([r['loss'] for r in other if 'loss' in r],
                               [r['loss'] for r in one if 'loss' in r], rtol=1e-5)
    np.testing.assert_allclose([r['val_loss'] for r in other if 'val_loss' in r],
                               [r['val_loss'] for r in epochs], rtol=1e-5)
    assert [r['topology_distance'] for r in other if 'val_loss' in r] == [
        r['topology_distance'] for r in epochs]
    assert other[-1]['test_ppl'] == pytest.approx(one[-1]['test_ppl'], rel=1e-4)
    assert other[-1]['density'] == one[-1]['density']


def test_batch_not_divisible_by_the_devices_is_refused(text_corpus_dir, tmp_path):
  done = subprocess.run(_cli(tmp_path, text_corpus_dir, '--config.num_devices=4', '--config.batch_size=6',
                             '--config.gradient_groups=0'),
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      'error: batch_size=6 is not divisible by the 4 devices of the mesh (set num_devices or the '
      'batch size)')
