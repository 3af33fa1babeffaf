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
(:class:`~selfish_jax.training.continuation.ContinuationAtSwitch`) instead of
retraining the first ``E - 1`` epochs; the continuation is the same run as one
trained from scratch (``--nofork_continuations`` trains them from scratch anyway).

The parts: this file is the command line; ``experiments.sweep`` the cells and
which are the same run, ``experiments.cell_log`` their logs,
``experiments.report`` the table and plot.
"""

from __future__ import annotations

import os

from absl import flags, logging
import jax
from ml_collections import config_flags

from experiments import cli, report, sweep
from experiments.cell_log import cell_log
from selfish_jax import optim
from selfish_jax.errors import UserError
from selfish_jax.sparsity import methods as methods_lib

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
      raise UserError(f'unknown method {name!r}; expected one of {tuple(methods_lib.METHODS)}')
  if _CELL.value:
    try:
      method, optimizer, seed = _CELL.value.split(',')
      seed = int(seed)
    except ValueError:
      raise UserError(f'--cell must be METHOD,OPTIMIZER,SEED, got {_CELL.value!r}') from None
    sweep.run_cell(base, workdir, method, optimizer, seed, lrs, _SHARE.value, _FORK.value)
    return
  if not _REPORT_ONLY.value:
    # SNT-ASGD first, so an SGD cell can find its finished twin.
    order = sorted(_OPTIMIZERS.value, key=lambda o: o != sweep.SOURCE_OPTIMIZER)
    cells = [(m, o, s) for s in seeds for m in _METHODS.value for o in order]
    results = {}
    for cell in cells:
      logging.info('%s', sweep.sweep_status(cells, results, running=cell))
      with cell_log(os.path.join(workdir, sweep.run_name(*cell)), show=_CELL_LOGS.value):
        results[cell] = sweep.run_cell(base, workdir, *cell, lrs, _SHARE.value, _FORK.value)
    logging.info('%s', sweep.sweep_status(cells, results, running=None))
  rows = report.collect(base, workdir, _METHODS.value, _OPTIMIZERS.value, seeds, lrs,
                        _SHARE.value)
  if jax.process_index() == 0:
    print(report.write_report(rows, workdir))


if __name__ == '__main__':
  cli.run(main, _CONFIG)
