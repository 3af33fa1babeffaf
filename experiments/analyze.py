r"""Mask dynamics of finished (or running) training runs, as plots and a summary.

  python -m experiments.analyze WORKDIR [WORKDIR ...] --out=DIR

Writes into ``DIR``:

* ``val_ppl.png``: validation perplexity per epoch of every run (averaging
  epochs drawn solid, SGD epochs dashed);
* ``itop.png``: the ITOP rate (fraction of the maskable weights ever active)
  per epoch;
* ``gate_density_<run>.png``: per fused gate matrix, each gate's density per
  epoch (how cell-gate redistribution moved the budget);
* ``nnstd.png``: the NNSTD between the final topologies of every pair of runs
  (neurons matched by the Hungarian algorithm, mean over matrices), as a heat
  map; runs of different seeds show how far their sparse networks drifted;
* ``summary.md``: a table of the runs and the NNSTD matrix.
"""

from __future__ import annotations

import os

from absl import flags
import numpy as np

from experiments import cli, plots
from selfish_jax.errors import ConfigError
from selfish_jax.training import metrics
from selfish_jax.training import workdir as workdir_lib

_OUT = flags.DEFINE_string('out', None, 'Folder for the plots and summary.md.')
flags.mark_flags_as_required(['out'])


def load_run(workdir: str) -> dict:
  """Config, epoch records, final record and final masks (None before any checkpoint)."""
  config = workdir_lib.read_config(workdir)
  if config is None:
    raise ConfigError(f'no training run in {workdir} (it has no config.json)')
  records = metrics.read_records(workdir)
  return {'name': os.path.basename(os.path.normpath(workdir)), 'config': config,
          'epochs': [r for r in records if metrics.record_kind(r) == metrics.EPOCH],
          'final': metrics.final_record(workdir) or {},
          'masks': _final_masks(workdir)}


def _final_masks(workdir: str):
  from selfish_jax.training.checkpoint import Checkpoints
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    return checkpoints.latest_masks()
  finally:
    checkpoints.close()


def nnstd_matrix(runs: list[dict]) -> np.ndarray:
  """Mean NNSTD over matrices between every pair of runs' final masks (NaN where
  a run has no masks or the two runs' matrices differ)."""
  from selfish_jax import sparsity
  n = len(runs)
  result = np.full((n, n), np.nan)
  for i in range(n):
    for j in range(i, n):
      a, b = runs[i]['masks'], runs[j]['masks']
      try:
        per_matrix = sparsity.nnstd_tree(a, b) if a is not None and b is not None else {}
      except ValueError:  # different models
        per_matrix = {}
      if per_matrix:
        result[i, j] = result[j, i] = float(np.mean(list(per_matrix.values())))
  return result


def _plot_curves(runs, key, ylabel, title, path, log=False):
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  for run in runs:
    epochs = [r for r in run['epochs'] if key in r]
    if not epochs:
      continue
    line, = ax.plot([r['epoch'] for r in epochs], [r[key] for r in epochs], '--',
                    label=run['name'])
    averaging = [r for r in epochs if r.get('optimizer') == 'asgd']
    if averaging:
      ax.plot([r['epoch'] for r in averaging], [r[key] for r in averaging], '-',
              color=line.get_color())
  plots.epoch_axis(ax)
  ax.set_ylabel(ylabel)
  ax.set_title(f'{title}\n(dashed: SGD phase; solid: averaging)', fontsize=9)
  if log:
    plots.readable_log_scale(ax)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot_gate_densities(run, path):
  import matplotlib.pyplot as plt
  epochs = [r for r in run['epochs'] if r.get('gate_density')]
  if not epochs:
    return False
  matrices = list(epochs[0]['gate_density'])
  cols = min(4, len(matrices))
  rows = -(-len(matrices) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, matrix in zip(axes.flat, matrices):
    for gate in epochs[0]['gate_density'][matrix]:
      ax.plot([r['epoch'] for r in epochs], [r['gate_density'][matrix][gate] for r in epochs],
              label=gate)
    ax.set_title(matrix, fontsize=8)
    plots.epoch_axis(ax, fontsize=7)
    ax.set_ylabel('active share of the gate', fontsize=7)
    ax.legend(fontsize=6)
  for ax in list(axes.flat)[len(matrices):]:
    ax.axis('off')
  fig.suptitle(f'{run["name"]}: density of each gate of each fused matrix per epoch '
               '(cell-gate redistribution)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def _plot_heat_map(matrix, names, path):
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 1.0 * len(names) + 2))
  image = ax.imshow(matrix, vmin=0, vmax=1, cmap='viridis')
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=7)
  ax.set_yticks(range(len(names)), names, fontsize=7)
  for (i, j), value in np.ndenumerate(matrix):
    if np.isfinite(value):
      ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=7, color='w')
  fig.colorbar(image, label='NNSTD (mean over matrices)')
  ax.set_title('Distance between final topologies (NNSTD: 0 the same, 1 unrelated)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _fmt(value, spec='.2f'):
  return '' if value is None else format(value, spec)


def summary_markdown(runs: list[dict], distances: np.ndarray) -> str:
  """The runs' table and the NNSTD matrix."""
  lines = ['| run | model | method | optimizer | seed | density | best val ppl | test ppl | '
           'final ITOP rate |', '|---|---|---|---|---|---|---|---|---|']
  for run in runs:
    c, final = run['config'], run['final']
    last = run['epochs'][-1] if run['epochs'] else {}
    lines.append(f"| {run['name']} | {c.get('model', 'lstm')} | {c['method']} | "
                 f"{c['optimizer']} | {c['seed']} | {_fmt(last.get('density'), '.3f')} | "
                 f"{_fmt(final.get('best_val_ppl'))} | {_fmt(final.get('test_ppl'))} | "
                 f"{_fmt(last.get('itop_rate'), '.3f')} |")
  names = [run['name'] for run in runs]
  lines += ['', 'NNSTD between the final topologies (mean over matrices; 0: the same up to a '
            'permutation of neurons, 1: nothing in common):', '',
            '| | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  for name, row in zip(names, distances):
    lines.append(f'| {name} | ' + ' | '.join('' if not np.isfinite(v) else f'{v:.3f}'
                                             for v in row) + ' |')
  return '\n'.join(lines) + '\n'


def analyze(workdirs: list[str], out: str) -> dict:
  """Writes the plots and ``summary.md`` into ``out``; returns what it computed."""
  import matplotlib
  matplotlib.use('Agg')
  runs = [load_run(w) for w in workdirs]
  seen = {}
  for index, run in enumerate(runs):  # distinct names for plots of same-named workdirs
    if run['name'] in seen:
      run['name'] = f"{run['name']}_{index + 1}"
    seen[run['name']] = run
  os.makedirs(out, exist_ok=True)
  _plot_curves(runs, 'val_ppl', 'validation perplexity', 'Validation perplexity per epoch',
               os.path.join(out, 'val_ppl.png'), True)
  _plot_curves(runs, 'itop_rate', 'ITOP rate (ever active / maskable)',
               'Share of the maskable weights active at some point so far (ITOP)',
               os.path.join(out, 'itop.png'))
  written = ['val_ppl.png', 'itop.png']
  for run in runs:
    name = f"gate_density_{run['name']}.png"
    if _plot_gate_densities(run, os.path.join(out, name)):
      written.append(name)
  distances = nnstd_matrix(runs)
  _plot_heat_map(distances, [run['name'] for run in runs], os.path.join(out, 'nnstd.png'))
  written.append('nnstd.png')
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(summary_markdown(runs, distances))
  return {'runs': [run['name'] for run in runs], 'nnstd': distances.tolist(),
          'files': written + ['summary.md']}


def main(argv):
  if len(argv) < 2:
    raise ConfigError('usage: python -m experiments.analyze WORKDIR [WORKDIR ...] --out=DIR')
  result = analyze(argv[1:], _OUT.value)
  print(f"wrote {', '.join(result['files'])} into {_OUT.value}")


if __name__ == '__main__':
  cli.run(main, None, positional_args=True)
