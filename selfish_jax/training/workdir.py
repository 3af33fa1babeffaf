"""A run's workdir: its ``config.json`` (and whether a resume may use it),
shared by every process of the run, and the lock that lets one run at a time
write it.

Paths go through ``etils.epath`` (what orbax writes checkpoints with), so a
workdir may be a local folder or an object-store URL (``gs://bucket/run``)
where the matching filesystem package is installed. A multi-process run needs
one workdir that every process sees (shared storage: a bucket, NFS): process 0
takes the lock and writes ``config.json`` (atomically,
:func:`~selfish_jax.storage.write_atomically`), every process waits for it,
and if any process does not see it (each host writing to its own local disk
under the same path) all of them stop with one line instead of hanging in the
first checkpoint.

**One run per workdir.** A second run started on a workdir in use stops at
once with one line naming the holder. On a disk (local or NFS) the lock is a
``flock`` on ``WORKDIR/lock``, which the kernel releases when the holder dies
however it dies. An object store has no locks: there ``WORKDIR/lock`` is a
lease, created only if absent (a generation precondition, so two runs cannot
both create it), renewed every :data:`LEASE_RENEW_S` seconds, and taken over
when it was not renewed for :data:`LEASE_EXPIRES_S` seconds or its holder, on
this host, is no longer running. What a lease cannot promise: two runs that
both find the same expired lease at the same moment can both take it over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Callable

from etils import epath
import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np

from selfish_jax import storage
from selfish_jax.errors import ConfigError, WorkdirError

CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'
LEASE_RENEW_S = 30.0
LEASE_EXPIRES_S = 120.0


def as_saved(config: ml_collections.ConfigDict | dict) -> dict:
  """``config`` as ``config.json`` holds it (tuples become lists), to compare with a saved one."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, 'to_dict') else config))


# Keys that may change when a run is resumed: they do not change its results.
RESUMABLE_CHANGES = frozenset({'data_dir', 'download', 'download_url', 'log_every',
                               'checkpoint_every_steps', 'num_devices'})


def changed_keys(saved: dict, config: ml_collections.ConfigDict,
                 may_change: frozenset[str] = frozenset()) -> list[str]:
  """The keys, sorted, in which ``config`` differs from a saved ``config.json``
  and that would change a run's results (neither in :data:`RESUMABLE_CHANGES`
  nor in ``may_change``)."""
  current = as_saved(config)
  ignored = RESUMABLE_CHANGES | may_change
  return sorted(k for k in set(saved) | set(current)
                if k not in ignored and saved.get(k) != current.get(k))


def check_resumable(saved: dict, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError if ``config`` differs from a workdir's saved config in a key that matters."""
  changed = changed_keys(saved, config)
  if changed:
    current = as_saved(config)
    details = ', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in changed)
    raise ConfigError(f'the workdir holds a run with a different config ({details}); '
                      'use a new workdir or the same settings')


def read_config(workdir: str | epath.PathLike) -> dict | None:
  """The config saved in ``workdir``, or None if there is none."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    saved = json.loads(path.read_bytes().decode('utf-8'))
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise WorkdirError(f'{path} cannot be read ({type(e).__name__}: {e}): it is not the config '
                       'this program writes; put the run\'s config.json back, or use a new '
                       'workdir') from e
  if not isinstance(saved, dict):
    raise WorkdirError(f'{path} holds no config (a JSON {type(saved).__name__}); put the run\'s '
                       'config.json back, or use a new workdir')
  return saved


def open_workdir(workdir: str, config: ml_collections.ConfigDict,
                 check: Callable[[dict, ml_collections.ConfigDict], None] = check_resumable
                 ) -> None:
  """Makes ``workdir`` hold this run's config, or checks the one it holds.

  A new workdir gets ``config`` as ``config.json`` (written by process 0);
  an existing one is passed to ``check(saved, config)`` (by default
  :func:`check_resumable`), on every process.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if jax.process_index() == 0:
    with _writing(path):
      if not path.exists():
        storage.write_atomically(path, json.dumps(as_saved(config), indent=1))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('selfish_jax: config.json written')
    seen = multihost_utils.process_allgather(np.array(path.exists()))
    if not np.all(seen):
      missing = [int(i) for i in np.flatnonzero(~np.asarray(seen))]
      raise ConfigError(
          f'process(es) {missing} do not see {path}, which process 0 wrote: the processes of a '
          'multi-host run need one workdir on storage they all share (a bucket such as '
          'gs://..., or NFS), not a local disk per host')
  saved = read_config(workdir)
  if saved is None:
    raise ConfigError(f'{path} could not be written')
  check(saved, config)


@contextlib.contextmanager
def _writing(path: epath.Path):
  """Within: a failure to write ``path`` (a missing bucket, missing credentials,
  no permission: each storage client raises its own type, none of which says
  which path it meant) becomes one WorkdirError naming it."""
  try:
    yield
  except WorkdirError:
    raise
  except Exception as error:  # pylint: disable=broad-except
    raise WorkdirError(f'cannot write {path} ({type(error).__name__}: {error}): check that '
                       'the folder or bucket exists and that this process may write to it'
                       ) from error


# ----------------------------------------------------------------------------- the lock


def _holder() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'renewed': time.time()}


def _describe(holder: dict | None) -> str:
  if not holder:
    return 'a run that has not said who it is yet'
  return (f'pid {holder.get("pid")} on host {holder.get("host")}, started '
          f'{holder.get("started")}')


def _running_here(holder: dict) -> bool:
  """Whether ``holder`` is a process on this host that is still running."""
  if holder.get('host') != socket.gethostname():
    return True  # cannot tell: assume it runs
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, TypeError, ValueError):
    return True
  return True


class _FileLock:
  """``flock`` on a file: released by the kernel when the holder exits or dies.

  The holder removes the file when it is done (so a finished run leaves no
  lock behind); a run that locked a file just removed tries again.
  """

  def __init__(self, path: str):
    self.path = path
    self._fd = None

  def acquire(self) -> dict | None:
    """None once held; the holder's description if another run holds it."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          os.close(fd)
          raise
        try:
          holder = json.loads(os.pread(fd, 4096, 0).decode() or 'null')
        except ValueError:
          holder = None
        os.close(fd)
        return holder or {}
      try:
        current = os.stat(self.path).st_ino
      except FileNotFoundError:
        current = None
      if current == os.fstat(fd).st_ino:
        break
      os.close(fd)  # its holder removed the file between our open and flock
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    self._fd = fd
    return None

  def release(self) -> None:
    if self._fd is not None:
      os.remove(self.path)
      os.close(self._fd)  # unlocks
      self._fd = None


class _LeaseLock:
  """A lease object on an object store, renewed by a background thread."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self._stop = threading.Event()
    self._renewer = None
    self._holder = None

  def _create(self) -> bool:
    import fsspec  # pylint: disable=g-import-not-at-top
    fs, path = fsspec.core.url_to_fs(os.fspath(self.path))
    try:
      with fs.open(path, 'xb') as f:  # created only if absent (gcsfs: ifGenerationMatch=0)
        f.write(json.dumps(self._holder).encode())
      return True
    except FileExistsError:
      return False

  def _read(self) -> dict | None:
    try:
      holder = json.loads(self.path.read_bytes().decode())
      return holder if isinstance(holder, dict) else None
    except (FileNotFoundError, ValueError):
      return None

  def acquire(self) -> dict | None:
    self._holder = _holder()
    for _ in range(2):
      if self._create():
        self._renewer = threading.Thread(target=self._renew, daemon=True,
                                         name='selfish_jax workdir lease')
        self._renewer.start()
        return None
      holder = self._read()
      stale = (holder is None or not _running_here(holder)
               or time.time() - float(holder.get('renewed', 0)) > LEASE_EXPIRES_S)
      if not stale:
        return holder
      try:  # an expired lease, or one whose holder died on this host: take it over
        self.path.unlink()
      except FileNotFoundError:
        pass
    return self._read() or {}

  def _renew(self) -> None:
    while not self._stop.wait(LEASE_RENEW_S):
      self._holder['renewed'] = time.time()
      try:
        self.path.write_bytes(json.dumps(self._holder).encode())
      except Exception:  # pylint: disable=broad-except
        pass  # a passing storage error: the next renewal tries again

  def release(self) -> None:
    if self._renewer is None:
      return
    self._stop.set()
    self._renewer.join()
    self._renewer = None
    try:
      self.path.unlink()
    except FileNotFoundError:
      pass


class WorkdirLock:
  """The lock of a workdir, held by process 0 of the run that writes it. A
  workdir the lock made is removed again at release if nothing else was
  written into it (a run refused for its data or config leaves nothing)."""

  def __init__(self, lock, made: epath.Path | None = None):
    self._lock, self._made = lock, made

  def release(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None
      if self._made is not None and not any(self._made.iterdir()):
        self._made.rmdir()


def lock_workdir(workdir: str) -> WorkdirLock:
  """Takes ``workdir``'s lock for this run (see the module docstring), making
  the folder if needed.

  Raises:
    WorkdirError: another run holds it (on every process of this run).
  """
  lock, holder, made = None, None, None
  if jax.process_index() == 0:
    path = epath.Path(workdir) / LOCK_FILE
    with _writing(path):
      if not storage.is_object_store(workdir) and not path.parent.exists():
        made = path.parent
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      lock = (_LeaseLock if storage.is_object_store(workdir) else _FileLock)(os.fspath(path))
      holder = lock.acquire()
  if jax.process_count() > 1:
    refused = bool(np.any(multihost_utils.process_allgather(np.array(holder is not None))))
  else:
    refused = holder is not None
  if refused:
    raise WorkdirError(f'{workdir} is in use by another run ('
                       + (_describe(holder) if jax.process_index() == 0 else 'process 0 says which')
                       + '); wait for it to end, or use another workdir')
  return WorkdirLock(lock, made)
