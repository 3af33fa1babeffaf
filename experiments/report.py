"""A sweep's table: one row per method x optimizer over the finished seeds
(``results.md``, ``results.json``) and the validation curves (``val_ppl.png``)."""

from __future__ import annotations

import io
import json
import os

from etils import epath
import numpy as np

from experiments import plots, sweep
from selfish_jax import storage
from selfish_jax.training import metrics


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values))


def collect(base, workdir, methods, optimizers, seeds, lrs, share: bool = True) -> list[dict]:
  """One row per method x optimizer with the finished seeds' statistics."""
  rows = []
  for method in methods:
    for optimizer in optimizers:
      runs = []
      for seed in seeds:
        name = sweep.run_name(method, optimizer, seed)
        if sweep.finished(os.path.join(workdir, name)) is None and share:
          name = sweep.identical_twin(base, workdir, method, optimizer, seed, lrs) or name
        path = os.path.join(workdir, name)
        final = sweep.finished(path)
        if final is None:
          continue
        epochs = metrics.read_records(path, metrics.EPOCH)
        runs.append({'seed': seed, 'final': final, 'val_ppl': [r['val_ppl'] for r in epochs],
                     'run': name})
      if not runs:
        continue
      config = sweep.cell_config(base, method, optimizer, seeds[0], lrs)
      rows.append({
          'method': method, 'optimizer': optimizer, 'seeds': [r['seed'] for r in runs],
          'params': runs[0]['final'].get('params'),
          'density': runs[0]['final']['density'],
          'best_val_ppl': _mean_std([r['final']['best_val_ppl'] for r in runs]),
          'test_ppl': _mean_std([r['final']['test_ppl'] for r in runs]),
          'train_flops': runs[0]['final'].get('train_flops_relative'),
          'optimizer_used': config.optimizer, 'lr': config.lr,
          'shared_with': sorted({r['run'] for r in runs
                                 if r['run'] != sweep.run_name(method, optimizer, r['seed'])}),
          'val_ppl_per_epoch': {r['seed']: r['val_ppl'] for r in runs}})
  return rows


def _fmt(pair, digits=2):
  mean, std = pair
  if mean is None:
    return ''
  return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if std else '')


def write_report(rows: list[dict], workdir: str) -> str:
  """Writes ``results.md``, ``results.json`` and ``val_ppl.png`` into ``workdir``
  (a folder or an object-store URL); returns the markdown table."""
  lines = ['| method | optimizer | params | density | best val ppl | test ppl | train FLOPs (x dense) |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    optimizer = r['optimizer'] + ('' if r['optimizer_used'] == r['optimizer']
                                  else f" ({r['optimizer_used']})")
    if r['shared_with']:
      optimizer += ' [= ' + ', '.join(r['shared_with']) + ']'  # the same run, see docstring
    lines.append(f"| {r['method']} | {optimizer} | {r['params'] or ''} | {r['density']:.3f} | "
                 f"{_fmt(r['best_val_ppl'])} | {_fmt(r['test_ppl'])} | "
                 f"{'' if r['train_flops'] is None else format(r['train_flops'], '.3f')} |")
  table = '\n'.join(lines) + '\n'
  storage.write_atomically(epath.Path(workdir, 'results.md'), table)
  storage.write_atomically(epath.Path(workdir, 'results.json'), json.dumps(rows, indent=1))
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  colors = plt.get_cmap('tab20').colors
  for i, r in enumerate(row for row in rows if not row['shared_with']):  # shared: same curve
    for seed, curve in r['val_ppl_per_epoch'].items():
      ax.plot(range(1, len(curve) + 1), curve, color=colors[i % len(colors)],
              linestyle='--' if r['optimizer'] == 'sgd' else '-',
              label=f"{r['method']}/{r['optimizer']}/{seed}")
  plots.epoch_axis(ax)
  ax.set_ylabel('validation perplexity')
  ax.set_title('Validation perplexity per epoch, method/optimizer/seed '
               '(dashed: sgd runs; solid: averaging optimizers)', fontsize=9)
  plots.readable_log_scale(ax)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=120)
  plt.close(fig)
  storage.write_atomically(epath.Path(workdir, 'val_ppl.png'), png.getvalue())
  return table
