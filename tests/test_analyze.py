"""experiments.analyze on two tiny runs of different seeds."""

import os
import subprocess
import sys

import numpy as np

from experiments import analyze
from selfish_jax import sparsity
from selfish_jax.training import metrics as metrics_lib
from selfish_jax.training.language_modelling import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_analyze_writes_plots_and_the_nnstd_of_runs(text_corpus_dir, tmp_path):
  from conftest import make_tiny_config
  workdirs = []
  for seed in (1, 2):
    config = make_tiny_config(text_corpus_dir, dataset='text')
    config.update(seed=seed, num_epochs=2, max_steps_per_epoch=3)
    workdir = str(tmp_path / f'seed{seed}')
    train_and_evaluate(config, workdir)
    workdirs.append(workdir)
  result = analyze.analyze(workdirs + [workdirs[0]], str(tmp_path / 'out'))
  assert sorted(os.listdir(tmp_path / 'out')) == sorted(result['files']) == sorted([
      'val_ppl.png', 'itop.png', 'gate_density_seed1.png', 'gate_density_seed2.png',
      'gate_density_seed1_3.png', 'nnstd.png', 'summary.md'])
  distances = np.array(result['nnstd'])
  np.testing.assert_array_equal(np.diag(distances), 0.0)
  assert distances[0, 2] == 0.0  # the same run twice
  # The mean NNSTD over the matrices of the two seeds' final masks.
  masks = [analyze.load_run(w)['masks'] for w in workdirs]
  expected = np.mean(list(sparsity.nnstd_tree(*masks).values()))
  assert distances[0, 1] == distances[1, 0] == expected > 0
  summary = (tmp_path / 'out' / 'summary.md').read_text()
  assert '| seed1 | lstm | selfish | snt_asgd | 1 | 0.330 |' in summary
  itop = summary.splitlines()[2].split('|')[-2].strip()
  last = metrics_lib.read_records(workdirs[0], metrics_lib.EPOCH)[-1]
  assert itop == f"{last['itop_rate']:.3f}" and last['itop_rate'] > 0.33
  # The command line: bad input is one line.
  missing = subprocess.run([sys.executable, '-m', 'experiments.analyze', str(tmp_path / 'none'),
                            f'--out={tmp_path / "o"}'], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines() == [
      f'error: no training run in {tmp_path / "none"} (it has no config.json)']


def test_analyze_needs_a_workdir():
  result = subprocess.run([sys.executable, '-m', 'experiments.analyze', '--out=/tmp/x'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and 'usage' in result.stderr
