"""Files on a local disk or in an object store (``gs://``, ``s3://``), through ``etils.epath``.

The two differ in how a file is replaced whole: on a disk it is written
beside its place and renamed over it; an object store has neither rename
(gcsfs copies, then deletes) nor append, but one upload replaces an object
at once. Writers that must never leave a part of a file call
:func:`write_atomically` and need not know which one they write to.
"""

from __future__ import annotations

import errno
import os
import uuid

from etils import epath


def is_object_store(path: str | os.PathLike) -> bool:
  """Whether ``path`` is an object-store URL (``gs://bucket/...``) rather than a local path."""
  return '://' in os.fspath(path)


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
  """``path`` holds either its old content or all of ``data`` (text is UTF-8), never a part.

  On a disk, a temporary file beside it (a unique name, so processes writing
  the same file do not collide) is renamed into place.
  """
  if isinstance(data, str):
    data = data.encode('utf-8')
  if is_object_store(path):
    epath.Path(path).write_bytes(data)
    return
  directory = os.path.dirname(os.fspath(path)) or '.'
  os.makedirs(directory, exist_ok=True)
  temporary = os.path.join(
      directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')
  # os.open applies the umask, as open() does (mkstemp's files are private).
  fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
_OUT_OF_SPACE_TEXT = ('No space left on device', 'Disk quota exceeded')


def is_out_of_space(error: BaseException) -> bool:
  """Whether ``error`` (or one it was raised from) says the storage is full:
  an ``OSError`` with ``ENOSPC``/``EDQUOT``, or the text of one that a library
  (tensorstore, orbax) re-raised as another type."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
      return True
    if any(text in str(error) for text in _OUT_OF_SPACE_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
  """Moves a file or folder to ``target`` (whose folder is made): a rename on a
  disk; on an object store, every object under it copied and deleted."""
  source, target = os.fspath(source), os.fspath(target)
  if is_object_store(source):
    import fsspec  # pylint: disable=g-import-not-at-top
    fs, path = fsspec.core.url_to_fs(source)
    fs.mv(path, fsspec.core.url_to_fs(target)[1], recursive=True)
    return
  os.makedirs(os.path.dirname(target), exist_ok=True)
  os.rename(source, target)
