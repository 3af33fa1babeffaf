"""A run's workdir: its ``config.json``, shared by every process of the run.

Paths go through ``etils.epath`` (what orbax writes checkpoints with), so a
workdir may be a local folder or an object-store URL (``gs://bucket/run``)
where the matching filesystem package is installed. A multi-process run needs
one workdir that every process sees (shared storage: a bucket, NFS): process 0
writes ``config.json`` (atomically, :func:`~selfish_jax.storage.write_atomically`), every
process waits for it, and if any process does not see it (each host
writing to its own local disk under the same path) all of them stop with one
line instead of hanging in the first checkpoint.
"""

from __future__ import annotations

import json
from typing import Callable

from etils import epath
import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np

from selfish_jax import storage
from selfish_jax.errors import ConfigError, WorkdirError

CONFIG_FILE = 'config.json'


def as_saved(config: ml_collections.ConfigDict) -> dict:
  """``config`` as ``config.json`` holds it (tuples become lists), to compare with a saved one."""
  return json.loads(json.dumps(config.to_dict()))


def read_config(workdir: str | epath.PathLike) -> dict | None:
  """The config saved in ``workdir``, or None if there is none."""
  path = epath.Path(workdir) / CONFIG_FILE
  return json.loads(path.read_text()) if path.exists() else None


def open_workdir(workdir: str, config_dict: dict, check: Callable[[dict], None]) -> None:
  """Makes ``workdir`` hold this run's config, or checks the one it holds.

  A new workdir gets ``config_dict`` as ``config.json`` (written by process 0);
  an existing one is passed to ``check`` (which raises ConfigError for a
  config that would change the results), on every process.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if jax.process_index() == 0:
    try:  # the run's first touch of its workdir
      if not path.exists():
        storage.write_atomically(path, json.dumps(config_dict, indent=1))
    except Exception as e:  # pylint: disable=broad-except
      # A missing bucket, missing credentials or no permission: each storage
      # client raises its own type, none of which says which path it meant.
      raise WorkdirError(f'cannot write {path} ({type(e).__name__}: {e}): check that the '
                         'folder or bucket exists and that this process may write to it') from e
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
  check(saved)
