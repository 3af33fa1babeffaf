r"""Markdown table of validation perplexity per epoch for one or more workdirs.

  python -m experiments.summarize /tmp/runs/dense /tmp/runs/selfish
"""

import os
import sys

from selfish_jax.training import metrics


def summarize(workdirs: list[str]) -> str:
  runs = {}
  for workdir in workdirs:
    epochs = {r['epoch']: r for r in metrics.read_records(workdir, metrics.EPOCH)}
    final = metrics.final_record(workdir) or {}
    runs[os.path.basename(os.path.normpath(workdir))] = (epochs, final)
  names = list(runs)
  last = max((max(e) for e, _ in runs.values() if e), default=0)
  lines = ['| epoch | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  for epoch in range(1, last + 1):
    cells = []
    for name in names:
      record = runs[name][0].get(epoch)
      cells.append('' if record is None else
                   f"{record['val_ppl']:.1f}" + (' (asgd)' if record['optimizer'] == 'asgd' else ''))
    lines.append(f'| {epoch} | ' + ' | '.join(cells) + ' |')
  for label, key in (('best val', 'best_val_ppl'), ('test', 'test_ppl')):
    lines.append(f'| {label} | ' + ' | '.join(
        f"{runs[n][1][key]:.2f}" if key in runs[n][1] else '' for n in names) + ' |')
  for label, key in (('s/epoch', 'epoch_time_s'), ('train tokens/s', 'train_tokens_per_s')):
    values = []
    for name in names:
      epochs = runs[name][0]
      values.append(f"{sum(r[key] for r in epochs.values()) / len(epochs):.0f}" if epochs else '')
    lines.append(f'| {label} (mean) | ' + ' | '.join(values) + ' |')
  return '\n'.join(lines)


if __name__ == '__main__':
  if len(sys.argv) < 2:
    sys.exit('usage: python -m experiments.summarize WORKDIR [WORKDIR ...]')
  print(summarize(sys.argv[1:]))
