"""Atomic checkpoints with orbax, and the rule that makes a workdir survive any kill.

``WORKDIR/checkpoints/<step>`` holds the full :class:`TrainState` (params,
masks, optimizer state with SNT-ASGD averages and counters, LSTM carry) and a
JSON record of the loop's host state (epoch, position in the epoch, trigger
history, best validation loss and the step of the best weights). The newest
:data:`KEEP` are kept, so one that cannot be read (a damaged disk, a copy cut
short) is moved aside into ``WORKDIR/unreadable/`` and the one before it
resumed. ``WORKDIR/best/<step>`` holds weights that scored best on validation
(the averaged ones once SNT-ASGD is on), saved at the step whose validation
they won, and ``WORKDIR/switch/<step>`` the state, host state and best
weights at the end of the epoch whose validation switched averaging on (what
other optimizers fork from).

**The checkpoint is the commit point.** Whatever a run writes for a step after
its latest checkpoint (best weights, a switch checkpoint, metric records)
belongs to no committed state until the next checkpoint names it: a run that
resumes from step ``S`` first discards every entry newer than ``S``
(:meth:`Checkpoints.discard_after`), and the best weights are the entry the
checkpoint's host state names, never merely the newest. So a kill at any point
of an epoch end (after the best weights, in the middle of the checkpoint,
before the records) resumes to the uninterrupted run's records. Orbax writes
each entry into a temporary folder and renames it when complete (on an object
store: marks it complete last), so an interrupted save never looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging as std_logging
import os
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Iterable

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from selfish_jax import storage
from selfish_jax.errors import WorkdirError

PyTree = Any

# Latest checkpoints kept: the newest, and the one to fall back to if it cannot be read.
KEEP = 2
UNREADABLE = 'unreadable'  # where checkpoints that cannot be read are moved
# Reads a reader of a running run tries while the run deletes what it reads.
_READ_ATTEMPTS = 5


def _manager(directory: str, max_to_keep: int | None, read_only: bool) -> ocp.CheckpointManager:
  # A local folder is made absolute; an object-store URL (gs://...) stays as it is.
  directory = directory if storage.is_object_store(directory) else os.path.abspath(directory)
  if not read_only:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True))
  # A reader creates nothing and cleans nothing up (the run may be writing);
  # orbax says so in a warning line each time, which is no news to a reader.
  with _log_filter('absl', lambda record: not _from_orbax(record)
                   or record.levelno > std_logging.WARNING):
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0))


def _from_orbax(record: std_logging.LogRecord) -> bool:
  return f'{os.sep}orbax{os.sep}' in record.pathname


@contextlib.contextmanager
def _log_filter(logger_name: str, keep: Callable[[std_logging.LogRecord], bool]):
  """Within: the records of the logger ``logger_name`` that ``keep`` refuses are not logged."""
  logger = std_logging.getLogger(logger_name)
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  line = text.splitlines()[0] if text else ''
  return f'{type(error).__name__}: {line[:300]}'


class Checkpoints:
  """The latest-state, best-weights and switch checkpoints of one workdir
  (``read_only``: of another run, or for a reader such as an export, which
  follows a running run that deletes what it was reading)."""

  def __init__(self, workdir: str, read_only: bool = False):
    self.workdir, self.read_only = workdir, read_only
    _drop_failed_read_leftovers()
    self._latest = _manager(os.path.join(workdir, 'checkpoints'), KEEP, read_only)
    self._best = _manager(os.path.join(workdir, 'best'), None, read_only)
    self._switch = _manager(os.path.join(workdir, 'switch'), None, read_only)

  # The latest state.

  def save_latest(self, step: int, state: PyTree, host_state: dict) -> None:
    """Commits ``step``: the state and host state (the older beyond :data:`KEEP` go)."""
    _save_state(self._latest, step, state, host_state)

  def latest_step(self) -> int | None:
    """The step of the latest checkpoint, or None if there is none."""
    return self._latest.latest_step()

  def restore_latest(self, like: PyTree) -> tuple[PyTree, dict] | None:
    """``(state, host_state)`` of the newest checkpoint that can be read, or None
    if there is none.

    A newer checkpoint that cannot be read while an older one can is moved
    into ``WORKDIR/unreadable/`` with a warning line (it would block saving
    its step again). If none can be read, nothing is moved and
    :class:`WorkdirError` names the newest.
    """
    unreadable = []
    for step in reversed(self._latest.all_steps()):
      try:
        restored = _restore_state(self._latest, step, like)
      except Exception as e:  # pylint: disable=broad-except
        # tensorstore, JSON and file errors alike: anything that stops the read.
        unreadable.append((step, _first_line(e)))
      else:
        for bad_step, error in unreadable:
          moved_to = self._move_aside(bad_step)
          logging.warning('The checkpoint of step %d in %s cannot be read (%s); it was moved to '
                          '%s and the run resumes from the checkpoint of step %d.', bad_step,
                          self._latest.directory, error, moved_to, step)
        return restored['state'], restored['host']
      # After the except block, which held the error and, through its frames,
      # the read's futures: only now can they be collected.
      _collect_failed_reads()
    if unreadable:
      step, error = unreadable[0]
      raise WorkdirError(
          f'no checkpoint in {self._latest.directory} can be read: the newest, '
          f'{self._latest.directory / str(step)}, fails with {error}; move the folder away to '
          'start the run over')
    return None

  def _move_aside(self, step: int) -> str:
    source = self._latest.directory / str(step)
    target = epath.Path(self.workdir) / UNREADABLE / f'checkpoints-{step}-{int(time.time())}'
    if jax.process_index() == 0:
      storage.move(source, target)
    _sync('unreadable checkpoint moved')
    self._latest.reload()
    return os.fspath(target)

  def discard_after(self, step: int) -> None:
    """Removes every best-weights and switch entry saved after ``step`` (-1: all of
    them): what a run killed after its checkpoint of ``step`` wrote for a step it
    never committed. Run before a resumed (or restarted) run writes anything."""
    for manager, what in ((self._best, 'best weights'), (self._switch, 'switch checkpoint')):
      for stale in [s for s in manager.all_steps() if s > step]:
        logging.info('Discarding the %s of step %d in %s: saved after the checkpoint the run '
                     'resumes from.', what, stale, manager.directory)
        manager.delete(stale)

  def latest_masks(self) -> PyTree | None:
    """The masks of the latest checkpoint, read without the model (nested dicts
    of arrays, None for dense leaves), or None if there is no checkpoint."""

    def read():
      step = self._latest.latest_step()
      if step is None:
        return None
      return self._latest.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))['state']['masks']

    return self._as_the_run_moves_on(read)

  def _as_the_run_moves_on(self, read: Callable[[], Any]) -> Any:
    """``read()``. A reader of a running run (``read_only``) reads again, on
    the new listing, when the run deleted what it was reading meanwhile: its
    older checkpoints and best weights go as it moves on."""
    if not self.read_only:
      return read()
    for attempt in range(1, _READ_ATTEMPTS + 1):
      listing = self._listing()
      try:
        return read()
      except Exception:  # pylint: disable=broad-except
        if attempt == _READ_ATTEMPTS or self._listing() == listing:
          raise  # nothing moved: the error is the reader's answer
      _collect_failed_reads()

  def _listing(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The steps of the latest checkpoints and best weights, as stored now."""
    self._latest.reload()
    self._best.reload()
    return tuple(self._latest.all_steps()), tuple(self._best.all_steps())

  # The best weights.

  def save_best(self, step: int, weights: PyTree) -> None:
    """Saves the weights that validated best at ``step``. They count once a
    checkpoint's host state names ``step`` (see the module docstring)."""
    _save(self._best, step, ocp.args.StandardSave(weights), weights)

  def keep_best(self, steps: Iterable[int | None]) -> None:
    """Deletes the best-weights entries other than ``steps`` (those the kept
    checkpoints name)."""
    keep = set(steps)
    for step in self._best.all_steps():
      if step not in keep:
        self._best.delete(step)

  def newest_best(self) -> int | None:
    """The newest best-weights entry (what workdirs written before the host
    state named its best step had)."""
    return self._best.latest_step()

  def best_step(self) -> int | None:
    """The step of the best weights that the latest checkpoint names (for readers
    of a run: an entry newer than the checkpoint is not committed yet)."""
    return self._as_the_run_moves_on(self._named_best_step)

  def _named_best_step(self) -> int | None:
    """:meth:`best_step`, read once."""
    step = self._latest.latest_step()
    if step is None:
      return self.newest_best()
    host = self._latest.restore(step, args=ocp.args.Composite(
        host=ocp.args.JsonRestore()))['host']
    return host['best_step'] if 'best_step' in host else self.newest_best()

  def restore_best(self, like: PyTree, step: int | None = None) -> PyTree | None:
    """The best weights saved at ``step`` (default: :meth:`best_step`), shaped like
    ``like``, or None if there are none."""
    best = step

    def read():
      nonlocal best
      best = self._named_best_step() if step is None else step
      if best is None:
        return None
      return self._best.restore(best, args=ocp.args.StandardRestore(_abstract(like)))

    try:
      return self._as_the_run_moves_on(read)
    except Exception as e:  # pylint: disable=broad-except
      error = _first_line(e)
    _collect_failed_reads()
    raise WorkdirError(f'the best weights {self._best.directory / str(best)} cannot be read '
                       f'({error})')

  # Where averaging switched on.

  def save_switch(self, step: int, state: PyTree, host_state: dict, best: PyTree) -> None:
    """Saves where averaging switched on: the state, the host state, and the best
    weights so far (a continuation's test must not miss an earlier best)."""
    _save_state(self._switch, step, state, host_state, best=best)

  def restore_switch(self, like: PyTree) -> tuple[PyTree, dict, PyTree] | None:
    """``(state, host_state, best weights)`` where averaging was switched on, or None."""
    step = self._switch.latest_step()
    if step is None:
      return None
    restored = _restore_state(self._switch, step, like, best=like.params)
    return restored['state'], restored['host'], restored['best']

  def close(self) -> None:
    self._latest.close()
    self._best.close()
    self._switch.close()


def _collect_failed_reads() -> None:
  """Collects the futures of a read that failed now rather than at some later
  moment (their leftovers are dropped: see :func:`_drop_failed_read_leftovers`)."""
  gc.collect()


def _is_failed_read_leftover(unraisable: Any) -> bool:
  error, origin = unraisable.exc_value, unraisable.object
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return True  # a read that completed after its event loop was closed
  code = getattr(origin, 'cr_code', None)  # an orbax read's coroutine, collected unfinished
  return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename


def _not_an_unretrieved_read_error(record: std_logging.LogRecord) -> bool:
  message = record.getMessage()
  return not ('exception was never retrieved' in message and (
      f'{os.sep}orbax{os.sep}' in message or 'TensorStore' in message))


def _drop_failed_read_leftovers() -> None:
  """Installs (once per process: each :class:`Checkpoints` calls it, before
  any read) what drops only the leftovers of failed orbax reads: the run's own
  warning or error says what could not be read.

  When one array of a read fails, the others are still being read; they
  finish after orbax closed the read's event loop, and each leaves a traceback
  ("Event loop is closed", its future's unretrieved error with a page of
  tensorstore spec, or its coroutine's "never awaited") from another thread,
  at any moment up to the exit: thousands of lines. Hence a
  ``sys.unraisablehook`` (chained to the hook before it), a filter on asyncio's
  log and one warnings filter, which stay.
  """
  std_logging.getLogger('asyncio').addFilter(_not_an_unretrieved_read_error)  # (added once)
  previous = sys.unraisablehook
  if not getattr(previous, 'drops_failed_read_leftovers', False):

    def hook(unraisable):
      if not _is_failed_read_leftover(unraisable):
        previous(unraisable)

    hook.drops_failed_read_leftovers = True
    sys.unraisablehook = hook
  # A read that had not started yet is collected as a coroutine never awaited.
  warnings.filterwarnings('ignore', message=r"coroutine '_read_array\w*' was never awaited",
                          category=RuntimeWarning)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'selfish_jax: {name}')


def _save_state(manager: ocp.CheckpointManager, step: int, state: PyTree, host_state: dict,
                **trees: PyTree) -> None:
  """Saves ``state``, the JSON ``host_state`` and any further named ``trees``."""
  _save(manager, step, ocp.args.Composite(
      state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state),
      **{name: ocp.args.StandardSave(tree) for name, tree in trees.items()}),
        (state, *trees.values()))


def _save(manager: ocp.CheckpointManager, step: int, args: Any, arrays: PyTree) -> None:
  """``manager.save`` of ``step``, waited for, once there is room for it."""
  _check_room(manager, arrays)
  with _orbax_errors_held_back():
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()


def _bytes_in(path: epath.Path) -> int:
  return sum(os.path.getsize(os.path.join(folder, name))
             for folder, _, names in os.walk(path) for name in names)


def _check_room(manager: ocp.CheckpointManager, arrays: PyTree) -> None:
  """On a disk, refuses a save that would not fit before anything of it is
  written (orbax's writer threads would fail half-way, each with a traceback):
  it takes about what the newest saved entry took, or the arrays' bytes."""
  if storage.is_object_store(manager.directory):
    return
  newest = manager.latest_step()
  need = (_bytes_in(manager.directory / str(newest)) if newest is not None else
          sum(leaf.nbytes for leaf in jax.tree.leaves(arrays)))
  free = shutil.disk_usage(manager.directory).free
  if free < 1.2 * need + (64 << 10):
    raise OSError(errno.ENOSPC, f'No space left on device: {free} bytes free in '
                  f'{manager.directory}, a checkpoint there takes about {need}')


@contextlib.contextmanager
def _orbax_errors_held_back():
  """Within: orbax's error lines (each with its writer thread's traceback) are
  held back. If the block fails because the storage is full they are dropped
  (the run's one line says so); otherwise they are logged when it ends."""
  held, full = [], False

  def hold(record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.ERROR and _from_orbax(record):
      held.append(record)
      return False
    return True

  try:
    with _log_filter('absl', hold):
      yield
  except Exception as e:  # pylint: disable=broad-except
    full = storage.is_out_of_space(e)
    raise
  finally:
    for record in [] if full else held:
      std_logging.getLogger('absl').handle(record)


def _restore_state(manager: ocp.CheckpointManager, step: int, like: PyTree,
                   **tree_likes: PyTree) -> dict:
  """The items of :func:`_save_state` at ``step`` (``'state'``, ``'host'`` and
  the trees named in ``tree_likes``, each shaped like its value)."""
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(like)), host=ocp.args.JsonRestore(),
      **{name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in tree_likes.items()}))
