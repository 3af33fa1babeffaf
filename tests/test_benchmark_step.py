import json
import subprocess
import sys

import pytest


def test_benchmark_prints_the_promised_figures():
  # A tiny model: this checks the output, not the speed.
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.step', '--config=experiments/configs/ptb_lstm_small.py',
       '--config.emsize=8', '--config.nhid=8', '--config.batch_size=4', '--config.bptt=5',
       '--config.density=0.25', '--steps=8', '--warmup=1', '--topology_repeats=2'],
      capture_output=True, text=True, check=True, timeout=300)
  figures = json.loads(result.stdout)
  assert figures['timed_steps'] == 8
  # The timed steps really train: the loss on the repeated window falls.
  assert figures['loss_last_timed_step'] < figures['loss_first_timed_step'] - 0.01
  # The timed topology updates keep the exact density: 25 % of every matrix.
  assert figures['density_after_topology_updates'] == pytest.approx(0.25, abs=1e-4)
  assert figures['topology_update_s'] > 0 and figures['topology_update_after_update_s'] > 0
  # One device: nothing to gather, and XLA's count of the step's work is there.
  assert figures['devices'] == 1 and figures['all_gathers'] == 0
  assert figures['gflop_per_device'] > 0
  # 3 x (2 FLOPs per weight of the two LSTM layers and the decoder) per token, 20 tokens.
  lstm = 2 * (8 * 32 + 8 * 32)
  assert figures['step_gflop'] * 1e9 == pytest.approx(3 * 20 * 2 * (lstm + 8 * 10_000), rel=1e-12)


def test_benchmark_times_only_the_asked_parts_of_any_family():
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.step', '--config=experiments/configs/ptb_onlstm_cpu.py',
       '--config.emsize=20', '--config.nhid=20', '--parts=topology', '--topology_repeats=1'],
      capture_output=True, text=True, check=True, timeout=300)
  figures = json.loads(result.stdout)
  assert figures['config']['model'] == 'onlstm'
  assert figures['density_after_topology_updates'] == pytest.approx(0.45, abs=1e-4)
  assert 'tokens_per_s' not in figures and 'eval_tokens_per_s' not in figures


def test_paper_config_check_reports_every_config_and_dtype():
  # The accelerator check at --small size: one JSON line per config, dtype and (for the
  # LSTM families) unroll, then a table.
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.paper_configs', '--small',
       '--configs=ptb_rhn,ptb_lstm_large', '--dtypes=float32,bfloat16', '--lstm_unrolls=2',
       '--steps=6', '--warmup=1'],
      capture_output=True, text=True, check=True, timeout=300)
  lines = result.stdout.strip().splitlines()
  rows = [json.loads(line) for line in lines if line.startswith('{')]
  assert [(r['config'], r['compute_dtype'], r['lstm_unroll']) for r in rows] == [
      ('ptb_rhn', 'float32', None), ('ptb_rhn', 'bfloat16', None),
      ('ptb_lstm_large', 'float32', 2), ('ptb_lstm_large', 'bfloat16', 2)]
  for row in rows:
    assert row['loss_last_timed_step'] < row['loss_first_timed_step'] - 0.1  # it trains
    assert row['devices'] >= 1 and row['compile_s'] > 0 and row['tokens_per_s'] > 0
  assert lines[-6].startswith('| config | dtype | lstm_unroll |')
  assert lines[-4].startswith('| ptb_rhn | float32 | - |')
  assert lines[-1].startswith('| ptb_lstm_large | bfloat16 | 2 |')
