r"""Every sparse-training method x optimizer at equal density, over seeds.

  python -m experiments.compare --config=experiments/configs/ptb_lstm_small.py \
      --methods=dense,static,set,dsr,snfs,rigl,selfish,gmp --optimizers=sgd,snt_asgd \
      --seeds=1111 --workdir=/tmp/compare --config.num_epochs=6

Each run trains in ``WORKDIR/<method>-<optimizer>-seed<seed>`` (finished runs
are skipped, interrupted ones resume), then ``results.md``, ``results.json``
and ``val_ppl.png`` are written into ``WORKDIR``. ``--cell=METHOD,OPTIMIZER,SEED``
runs one run only, so a cluster can fan the sweep out; a final call without
``--cell`` (or with ``--report_only``) collects the table. The terminal shows
where the sweep stands (cells done with their test perplexity, the one
running, how many are left); each cell's own lines go to its ``train.log``
(``--cell_logs`` shows them too). SNFS needs momentum:
with ``sgd``/``snt_asgd`` it runs with SGD momentum instead, as its paper does.

Identical runs are trained once (``--noshare_identical`` trains every cell):
SGD and SNT-ASGD take the same steps until the non-monotone trigger fires, so
an ``sgd`` cell whose ``snt_asgd`` twin finished without the trigger ever
firing *is* that run (checked by replaying the trigger on the twin's recorded
validation losses), and cells whose resolved configs are equal (SNFS with
``sgd`` and ``snt_asgd``, both SGD momentum) share one run. Shared rows say so
(``shared_with`` in results.json, a mark in results.md).

With a fixed switch (``--config.asgd_start_epoch=E``) the ``sgd`` and ``asgd``
cells fork from their ``snt_asgd`` twin's checkpoint at the switch
(:class:`ContinuationAtSwitch`) instead of retraining the first ``E - 1``
epochs; the continuation is the same run as one trained from scratch
(``--nofork_continuations`` trains them from scratch anyway).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging as std_logging
import os
import tempfile

from absl import flags, logging
from absl import logging as absl_logging
from etils import epath
import jax
import numpy as np
from ml_collections import config_flags

from experiments import cli, plots
from selfish_jax import optim, storage
from selfish_jax.errors import ConfigError, UserError
from selfish_jax.sparsity import methods as methods_lib
from selfish_jax.training import core as core_lib
from selfish_jax.training import metrics, train
from selfish_jax.training import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Base experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the sweep.')
_METHODS = flags.DEFINE_list('methods', list(methods_lib.METHODS), 'Methods to compare.')
_OPTIMIZERS = flags.DEFINE_list('optimizers', ['sgd', 'snt_asgd'], 'Optimizers to compare.')
_SEEDS = flags.DEFINE_list('seeds', None, 'Seeds (default: the config seed).')
_CELL = flags.DEFINE_string('cell', None, 'Run only METHOD,OPTIMIZER,SEED.')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only collect finished runs.')
_SHARE = flags.DEFINE_bool('share_identical', True,
                           'Train identical cells once (see the module docstring).')
_FORK = flags.DEFINE_bool('fork_continuations', True,
                          'With asgd_start_epoch set, fork sgd/asgd cells from the snt_asgd '
                          'run at its switch.')
_CELL_LOGS = flags.DEFINE_bool(
    'cell_logs', False, "Also show each cell's training lines in the terminal (they are always "
    'in WORKDIR/<cell>/train.log); by default the terminal shows where the sweep stands.')
_DISTRIBUTED = cli.DistributedFlags()
_LRS = flags.DEFINE_list(
    'lrs', [f'{name}:{entry.sweep_lr}' for name, entry in optim.OPTIMIZERS.items()
            if entry.sweep_lr is not None],
    'Learning rates per optimizer (others use --config.lr).')
flags.mark_flags_as_required(['config', 'workdir'])


# Optimizers whose SGD phase carries no state: a run of one can continue another's.
FORKABLE_OPTIMIZERS = tuple(name for name, entry in optim.OPTIMIZERS.items() if entry.sgd_phase)


def check_forkable(source: str, source_config: dict, config) -> None:
  """Raises ConfigError unless ``config`` may continue the run in ``source``
  (whose config is ``source_config``)."""
  changed = core_lib.changed_keys(source_config, config, frozenset({'optimizer'}))
  if changed:
    raise ConfigError(f'cannot fork from {source}: its config differs in {", ".join(changed)}')
  for optimizer in (source_config.get('optimizer'), config.optimizer):
    if optimizer not in FORKABLE_OPTIMIZERS:
      raise ConfigError(f'cannot fork between optimizers other than {FORKABLE_OPTIMIZERS}: '
                        f'{optimizer!r} has SGD-phase state')


class ContinuationAtSwitch:
  """A new run's start (:data:`selfish_jax.training.loop.Start`): the run in
  ``source`` where it switched averaging on, continued with this run's
  optimizer (:meth:`SparseTraining.continue_after_switch`).

  The source's records up to the switch are copied (with the topology update
  the continuation made, if any), so the curves are complete, and so are its
  best weights so far, which the continuation's test reads unless it improves.
  """

  def __init__(self, source: str, config):
    self.source = source
    self._config = config

  def __call__(self, state, core):
    source_config = workdir_lib.read_config(self.source)
    if source_config is None:
      raise ConfigError(f'cannot fork from {self.source}: no config.json (not a run)')
    check_forkable(self.source, source_config, self._config)
    source_tx = optim.make_optimizer(source_config['optimizer'], self._config.lr)
    restored = core_lib.restore_at_switch(self.source, state, source_tx)
    if restored is None:
      raise ConfigError(f'cannot fork from {self.source}: it has not switched averaging on '
                        '(no switch checkpoint yet)')
    state, host, best = restored
    state, moved = core.continue_after_switch(state, host.epoch - 1)
    records = [r for r in metrics.read_records(self.source) if r['step'] <= int(state.step)]
    if moved:
      records[-1] = {**records[-1], **core.mask_fields(state), 'topology_distance': moved}
    logging.info('Forked from %s at step %d (end of epoch %d) with optimizer %s.', self.source,
                 int(state.step), host.epoch - 1, self._config.optimizer)
    return state, host, records, best


def run_name(method: str, optimizer: str, seed: int) -> str:
  return f'{method}-{optimizer}-seed{seed}'


def cell_config(base, method: str, optimizer: str, seed: int, lrs: dict):
  config = base.copy_and_resolve_references()
  grows_by_momentum = methods_lib.make_method(method, density=base.density, growth=base.growth,
                                              total_steps=1).grows_by == 'momentum'
  if grows_by_momentum and not optim.OPTIMIZERS[optimizer].first_moment:
    optimizer = 'momentum'  # as SNFS's paper runs it with SGD
  config.update(method=method, optimizer=optimizer, seed=seed,
                lr=lrs.get(optimizer, base.lr))
  return config


def finished(workdir: str) -> dict | None:
  return metrics.final_record(workdir)


def _never_averaged(config, records: list[dict]) -> bool:
  """Whether averaging would have started in none of the run's epochs: neither
  at the fixed ``asgd_start_epoch`` nor by SNT-ASGD's trigger (replayed)."""
  losses = [r['val_loss'] for r in records if metrics.record_kind(r) == metrics.EPOCH]
  if config.asgd_start_epoch and config.asgd_start_epoch <= len(losses):
    return False
  return not any(r.get('optimizer') == 'asgd' for r in records) and not any(
      core_lib.nonmonotone_trigger(losses[:i], losses[i], config.nonmono)
      for i in range(len(losses)))


def identical_twin(base, workdir, method, optimizer, seed, lrs) -> str | None:
  """The finished run of another optimizer that this cell's run would repeat step for step."""
  config = cell_config(base, method, optimizer, seed, lrs)
  for other in ('snt_asgd', 'sgd', 'asgd', 'momentum'):
    if other == optimizer:
      continue
    twin = cell_config(base, method, other, seed, lrs)
    exact = twin.to_dict() == config.to_dict()
    until_trigger = False  # the same steps unless the trigger fired
    if not exact and {config.optimizer, twin.optimizer} <= set(FORKABLE_OPTIMIZERS):
      twin.optimizer = config.optimizer
      until_trigger = twin.to_dict() == config.to_dict()
    path = os.path.join(workdir, run_name(method, other, seed))
    if not (exact or until_trigger) or finished(path) is None:
      continue
    if exact or _never_averaged(config, metrics.read_records(os.path.join(path, 'metrics.jsonl'))):
      return run_name(method, other, seed)
  return None


def run_cell(base, workdir, method, optimizer, seed, lrs, share: bool = True,
             fork: bool = True) -> dict:
  path = os.path.join(workdir, run_name(method, optimizer, seed))
  done = finished(path)
  if done is not None:
    logging.info('%s already finished: test ppl %.2f', path, done['test_ppl'])
    return done
  twin = identical_twin(base, workdir, method, optimizer, seed, lrs) if share else None
  if twin is not None:
    logging.info('%s: identical to the finished run %s, not trained again', path, twin)
    return finished(os.path.join(workdir, twin))
  config = cell_config(base, method, optimizer, seed, lrs)
  source = os.path.join(workdir, run_name(method, 'snt_asgd', seed))
  start = None
  if (fork and base.asgd_start_epoch and config.optimizer in ('sgd', 'asgd')
      and epath.Path(source, 'switch').is_dir()):
    start = ContinuationAtSwitch(source, config)
  return train.train_and_evaluate(config, path, start=start)


class _TrainingInfo(std_logging.Filter):
  """Holds back the INFO lines of the training code (a cell's progress and epochs)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or (
        os.sep + os.path.join('selfish_jax', 'training') + os.sep) not in record.pathname


@contextlib.contextmanager
def cell_log(path: str, show: bool):
  """Within: every log line goes to ``path/train.log`` too (process 0's), and
  unless ``show`` the terminal leaves out the training code's INFO lines.

  An object store cannot append: there the lines go to a local file, added
  to ``train.log`` when the block ends (a process killed meanwhile loses them).
  """
  to_file, uploaded_to = std_logging.NullHandler(), None
  if jax.process_index() == 0:
    log_path = os.path.join(path, 'train.log')
    if storage.is_object_store(path):
      with tempfile.NamedTemporaryFile('w', suffix='.log', delete=False) as local:
        uploaded_to, log_path = log_path, local.name
    else:
      os.makedirs(path, exist_ok=True)
    to_file = std_logging.FileHandler(log_path)
    to_file.setFormatter(absl_logging.PythonFormatter())
  absl_logging.get_absl_logger().addHandler(to_file)
  terminal, held_back = absl_logging.get_absl_handler(), _TrainingInfo()
  if not show:
    terminal.addFilter(held_back)
  try:
    yield
  finally:
    terminal.removeFilter(held_back)
    absl_logging.get_absl_logger().removeHandler(to_file)
    to_file.close()
    if uploaded_to is not None:
      target = epath.Path(uploaded_to)
      with open(log_path) as f:
        lines = f.read()
      os.remove(log_path)
      storage.write_atomically(
          target, (target.read_text() if target.exists() else '') + lines)


def sweep_status(cells: list[tuple], results: dict, running: tuple | None) -> str:
  """One line on where a sweep stands: cells done (with their test perplexity),
  the one running, how many are left."""
  done = ', '.join(f'{"/".join(map(str, cell))} {results[cell]["test_ppl"]:.2f}'
                   for cell in cells if cell in results)
  left = len(cells) - len(results) - (running is not None)
  now = f'running {"/".join(map(str, running))}; ' if running else ''
  return (f'sweep: {len(results)}/{len(cells)} cells done'
          + (f' (test ppl: {done})' if done else '') + f'; {now}{left} left')


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
        name = run_name(method, optimizer, seed)
        if finished(os.path.join(workdir, name)) is None and share:
          name = identical_twin(base, workdir, method, optimizer, seed, lrs) or name
        path = os.path.join(workdir, name)
        final = finished(path)
        if final is None:
          continue
        epochs = metrics.read_records(path, metrics.EPOCH)
        runs.append({'seed': seed, 'final': final, 'val_ppl': [r['val_ppl'] for r in epochs],
                     'run': name})
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
          'shared_with': sorted({r['run'] for r in runs
                                 if r['run'] != run_name(method, optimizer, r['seed'])}),
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


def main(argv):
  del argv
  _DISTRIBUTED.run(_sweep)


def _sweep():
  base = _CONFIG.value
  workdir = _WORKDIR.value
  lrs = {k: float(v) for k, v in (item.split(':') for item in _LRS.value)}
  seeds = [int(s) for s in (_SEEDS.value or [base.seed])]
  for name in _METHODS.value:
    if name not in methods_lib.METHODS:
      raise UserError(f'unknown method {name!r}; expected one of {methods_lib.METHODS}')
  if _CELL.value:
    try:
      method, optimizer, seed = _CELL.value.split(',')
      seed = int(seed)
    except ValueError:
      raise UserError(f'--cell must be METHOD,OPTIMIZER,SEED, got {_CELL.value!r}') from None
    run_cell(base, workdir, method, optimizer, seed, lrs, _SHARE.value, _FORK.value)
    return
  if not _REPORT_ONLY.value:
    # SNT-ASGD first, so an SGD cell can find its finished twin.
    order = sorted(_OPTIMIZERS.value, key=lambda o: o != 'snt_asgd')
    cells = [(m, o, s) for s in seeds for m in _METHODS.value for o in order]
    results = {}
    for cell in cells:
      logging.info('%s', sweep_status(cells, results, running=cell))
      with cell_log(os.path.join(workdir, run_name(*cell)), show=_CELL_LOGS.value):
        results[cell] = run_cell(base, workdir, *cell, lrs, _SHARE.value, _FORK.value)
    logging.info('%s', sweep_status(cells, results, running=None))
  rows = collect(base, workdir, _METHODS.value, _OPTIMIZERS.value, seeds, lrs, _SHARE.value)
  if jax.process_index() == 0:
    print(write_report(rows, workdir))


if __name__ == '__main__':
  cli.run(main, _CONFIG)
