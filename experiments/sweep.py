"""The cells of a method x optimizer x seed sweep, and which of them are the same run.

Each cell trains in ``WORKDIR/<method>-<optimizer>-seed<seed>``. Identical runs
are trained once: SGD and SNT-ASGD (optimizers with a stateless SGD phase,
:attr:`selfish_jax.optim.OptimizerEntry.sgd_phase`) take the same steps until
averaging starts, so an ``sgd`` cell whose finished ``snt_asgd`` twin never
averaged *is* that run (checked by replaying the trigger on the twin's
recorded validation losses), and cells whose resolved configs are equal (SNFS
with ``sgd`` and ``snt_asgd``, both SGD momentum) share one run. With a fixed
switch (``asgd_start_epoch``) the other cells of such optimizers fork from
their ``snt_asgd`` twin at the switch
(:class:`~selfish_jax.training.continuation.ContinuationAtSwitch`).
"""

from __future__ import annotations

import os

from absl import logging
from etils import epath

from selfish_jax import optim
from selfish_jax.sparsity import methods as methods_lib
from selfish_jax.training import core as core_lib
from selfish_jax.training import language_modelling, metrics
from selfish_jax.training.continuation import ContinuationAtSwitch, forkable_optimizers

# The run every fork starts from: the one whose averaging switches on at the trigger.
SOURCE_OPTIMIZER = 'snt_asgd'


def run_name(method: str, optimizer: str, seed: int) -> str:
  return f'{method}-{optimizer}-seed{seed}'


def cell_config(base, method: str, optimizer: str, seed: int, lrs: dict):
  """The config of one cell: the method, optimizer (a method that grows by
  momentum gets SGD momentum where the optimizer has none, as SNFS's paper
  runs it), seed and the optimizer's lr from ``lrs`` (default: the base's)."""
  config = base.copy_and_resolve_references()
  grows_by_momentum = methods_lib.make_method(method, density=base.density, growth=base.growth,
                                              total_steps=1).grows_by == 'momentum'
  if grows_by_momentum and not optim.OPTIMIZERS[optimizer].first_moment:
    optimizer = 'momentum'
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
  same_until_averaging = set(forkable_optimizers())
  for other in optim.OPTIMIZERS:
    if other == optimizer:
      continue
    twin = cell_config(base, method, other, seed, lrs)
    exact = twin.to_dict() == config.to_dict()
    until_trigger = False  # the same steps unless the trigger fired
    if not exact and {config.optimizer, twin.optimizer} <= same_until_averaging:
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
  """The cell's final record: a finished run's, its identical twin's (``share``),
  or one trained now (forked from its ``snt_asgd`` twin at a fixed switch when
  ``fork`` and that twin has switched)."""
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
  source = os.path.join(workdir, run_name(method, SOURCE_OPTIMIZER, seed))
  start = None
  if (fork and base.asgd_start_epoch and config.optimizer != SOURCE_OPTIMIZER
      and config.optimizer in forkable_optimizers() and epath.Path(source, 'switch').is_dir()):
    start = ContinuationAtSwitch(source, config)
  return language_modelling.train_and_evaluate(config, path, start=start)


def sweep_status(cells: list[tuple], results: dict, running: tuple | None) -> str:
  """One line on where a sweep stands: cells done (with their test perplexity),
  the one running, how many are left."""
  done = ', '.join(f'{"/".join(map(str, cell))} {results[cell]["test_ppl"]:.2f}'
                   for cell in cells if cell in results)
  left = len(cells) - len(results) - (running is not None)
  now = f'running {"/".join(map(str, running))}; ' if running else ''
  return (f'sweep: {len(results)}/{len(cells)} cells done'
          + (f' (test ppl: {done})' if done else '') + f'; {now}{left} left')
