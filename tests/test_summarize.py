"""The per-epoch summary table of experiments.summarize."""

import json

import pytest

from experiments.summarize import summarize


def test_summary_table(tmp_path):
  run = tmp_path / 'selfish'
  run.mkdir()
  records = [
      {'step': 10, 'loss': 6.0, 'tokens_per_s': 1.0},
      {'step': 10, 'epoch': 1, 'val_ppl': 400.0, 'optimizer': 'sgd', 'epoch_time_s': 10.0,
       'train_tokens_per_s': 8000.0},
      {'step': 20, 'epoch': 2, 'val_ppl': 200.0, 'optimizer': 'asgd', 'epoch_time_s': 20.0,
       'train_tokens_per_s': 9000.0},
      {'step': 20, 'test_ppl': 190.5, 'best_val_ppl': 200.0},
  ]
  (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  table = summarize([str(run)]).splitlines()
  assert table[0] == '| epoch | selfish |'
  assert table[2:4] == ['| 1 | 400.0 |', '| 2 | 200.0 (asgd) |']
  assert '| test | 190.50 |' in table
  assert '| s/epoch (mean) | 15 |' in table


def test_records_are_read_by_kind_also_from_runs_written_before_kinds(tmp_path):
  from selfish_jax.training import metrics
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 4, "loss": 3.0}\n{"step": 8, "epoch": 1, "val_loss": 2.9}\n'
      '{"kind": "train", "step": 12, "loss": 2.8}\n{"step": 12, "test_ppl": 17.0}\n')
  assert [r['step'] for r in metrics.read_records(str(tmp_path), 'train')] == [4, 12]
  assert [r['step'] for r in metrics.read_records(str(tmp_path), 'epoch')] == [8]
  assert metrics.final_record(str(tmp_path))['test_ppl'] == 17.0
  assert metrics.final_record(str(tmp_path / 'nothing')) is None
  with pytest.raises(ValueError, match="unknown record kind 'val'"):
    metrics.read_records(str(tmp_path), 'val')
