"""The per-epoch summary table of experiments.summarize."""

import json

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
