r"""Every sparse-training method x optimizer at equal density, over seeds.

  python -m experiments.compare --config=experiments/configs/ptb_lstm_small.py \
      --methods=dense,static,set,dsr,snfs,rigl,selfish,gmp --optimizers=sgd,snt_asgd \
      --seeds=1111 --workdir=/tmp/compare --config.num_epochs=6

Each run trains in ``WORKDIR/<method>-<optimizer>-seed<seed>`` (finished runs
are skipped, interrupted ones resume), then ``results.md``, ``results.json``
and ``val_ppl.png`` are written into ``WORKDIR``. ``--cell=METHOD,OPTIMIZER,SEED``
runs one run only, so a cluster can fan the sweep out; a final call without
``--cell`` (or with ``--report_only``) collects the table. SNFS needs momentum:
with ``sgd``/``snt_asgd`` it runs with SGD momentum instead, as its paper does.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
import numpy as np
from ml_collections import config_flags

from selfish_jax.errors import UserError
from selfish_jax.sparsity import methods as methods_lib
from selfish_jax.training import metrics, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Base experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the sweep.')
_METHODS = flags.DEFINE_list('methods', list(methods_lib.METHODS), 'Methods to compare.')
_OPTIMIZERS = flags.DEFINE_list('optimizers', ['sgd', 'snt_asgd'], 'Optimizers to compare.')
_SEEDS = flags.DEFINE_list('seeds', None, 'Seeds (default: the config seed).')
_CELL = flags.DEFINE_string('cell', None, 'Run only METHOD,OPTIMIZER,SEED.')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only collect finished runs.')
_LRS = flags.DEFINE_list('lrs', ['momentum:2.0', 'adam:0.002'],
                         'Learning rates per optimizer (others use --config.lr).')
flags.mark_flags_as_required(['config', 'workdir'])


def run_name(method: str, optimizer: str, seed: int) -> str:
  return f'{method}-{optimizer}-seed{seed}'


def cell_config(base, method: str, optimizer: str, seed: int, lrs: dict):
  config = base.copy_and_resolve_references()
  if method == 'snfs' and optimizer in ('sgd', 'snt_asgd'):
    optimizer = 'momentum'
  config.update(method=method, optimizer=optimizer, seed=seed,
                lr=lrs.get(optimizer, base.lr))
  return config


def finished(workdir: str) -> dict | None:
  records = metrics.read_records(os.path.join(workdir, 'metrics.jsonl'))
  return records[-1] if records and 'test_ppl' in records[-1] else None


def run_cell(base, workdir, method, optimizer, seed, lrs) -> dict:
  path = os.path.join(workdir, run_name(method, optimizer, seed))
  done = finished(path)
  if done is not None:
    logging.info('%s already finished: test ppl %.2f', path, done['test_ppl'])
    return done
  return train.train_and_evaluate(cell_config(base, method, optimizer, seed, lrs), path)


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values))


def collect(base, workdir, methods, optimizers, seeds, lrs) -> list[dict]:
  """One row per method x optimizer with the finished seeds' statistics."""
  rows = []
  for method in methods:
    for optimizer in optimizers:
      runs = []
      for seed in seeds:
        path = os.path.join(workdir, run_name(method, optimizer, seed))
        final = finished(path)
        if final is None:
          continue
        epochs = [r for r in metrics.read_records(os.path.join(path, 'metrics.jsonl'))
                  if 'val_ppl' in r]
        runs.append({'seed': seed, 'final': final, 'val_ppl': [r['val_ppl'] for r in epochs]})
      if not runs:
        continue
      config = cell_config(base, method, optimizer, seeds[0], lrs)
      rows.append({
          'method': method, 'optimizer': optimizer, 'seeds': [r['seed'] for r in runs],
          'params': runs[0]['final'].get('params'),
          'density': runs[0]['final']['density'],
          'best_val_ppl': _mean_std([r['final']['best_val_ppl'] for r in runs]),
          'test_ppl': _mean_std([r['final']['test_ppl'] for r in runs]),
          'train_flops': runs[0]['final'].get('train_flops_relative'),
          'optimizer_used': config.optimizer, 'lr': config.lr,
          'val_ppl_per_epoch': {r['seed']: r['val_ppl'] for r in runs}})
  return rows


def _fmt(pair, digits=2):
  mean, std = pair
  if mean is None:
    return ''
  return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if std else '')


def write_report(rows: list[dict], workdir: str) -> None:
  lines = ['| method | optimizer | params | density | best val ppl | test ppl | train FLOPs (x dense) |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    optimizer = r['optimizer'] + ('' if r['optimizer_used'] == r['optimizer']
                                  else f" ({r['optimizer_used']})")
    lines.append(f"| {r['method']} | {optimizer} | {r['params'] or ''} | {r['density']:.3f} | "
                 f"{_fmt(r['best_val_ppl'])} | {_fmt(r['test_ppl'])} | "
                 f"{'' if r['train_flops'] is None else format(r['train_flops'], '.3f')} |")
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  for r in rows:
    for seed, curve in r['val_ppl_per_epoch'].items():
      ax.plot(range(1, len(curve) + 1), curve, label=f"{r['method']}/{r['optimizer']}/{seed}")
  ax.set_xlabel('epoch')
  ax.set_ylabel('validation perplexity')
  ax.set_yscale('log')
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'val_ppl.png'), dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  base = _CONFIG.value
  workdir = _WORKDIR.value
  lrs = {k: float(v) for k, v in (item.split(':') for item in _LRS.value)}
  seeds = [int(s) for s in (_SEEDS.value or [base.seed])]
  try:
    for name in _METHODS.value:
      if name not in methods_lib.METHODS:
        raise UserError(f'unknown method {name!r}; expected one of {methods_lib.METHODS}')
    if _CELL.value:
      method, optimizer, seed = _CELL.value.split(',')
      run_cell(base, workdir, method, optimizer, int(seed), lrs)
      return
    if not _REPORT_ONLY.value:
      for seed in seeds:
        for method in _METHODS.value:
          for optimizer in _OPTIMIZERS.value:
            run_cell(base, workdir, method, optimizer, seed, lrs)
    rows = collect(base, workdir, _METHODS.value, _OPTIMIZERS.value, seeds, lrs)
    write_report(rows, workdir)
    print(open(os.path.join(workdir, 'results.md')).read())
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
