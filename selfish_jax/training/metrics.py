"""Metrics to ``WORKDIR/metrics.jsonl`` (one JSON object a line) and TensorBoard."""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

from absl import logging
from etils import epath

from selfish_jax import storage
from selfish_jax.errors import WorkdirError

try:  # TensorBoard event files are optional.
  from tensorboardX import SummaryWriter
except ImportError:  # pragma: no cover
  SummaryWriter = None


def _flatten(record: Mapping[str, Any], prefix: str = '') -> dict[str, float]:
  scalars = {}
  for key, value in record.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      scalars.update(_flatten(value, name + '/'))
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
      scalars[name] = float(value)
  return scalars


# What a record is: a training interval's losses, an epoch's validation and
# mask statistics, or the run's final (test) result.
TRAIN, EPOCH, FINAL = 'train', 'epoch', 'final'
KINDS = (TRAIN, EPOCH, FINAL)


def record_kind(record: Mapping[str, Any]) -> str:
  """``record['kind']``; for records written before kinds existed, what its keys say."""
  if 'kind' in record:
    return record['kind']
  if 'test_ppl' in record or 'best_accuracy' in record:
    return FINAL
  if {'val_loss', 'val_ppl', 'held_out_loss'} & set(record):
    return EPOCH
  return TRAIN


def read_records(path: str, kind: str | None = None) -> list[dict]:
  """The records of a ``metrics.jsonl`` file or of the run folder holding it
  (empty if there is none), all of them or those of one ``kind``.

  A last line cut short (what a kill in the middle of a write leaves) is left
  out with a warning; any other line that is not a record raises
  :class:`~selfish_jax.errors.WorkdirError` naming the file and line.
  """
  if kind is not None and kind not in KINDS:
    raise ValueError(f'unknown record kind {kind!r}; expected one of {KINDS}')
  path = epath.Path(path)
  if path.is_dir():
    path = path / 'metrics.jsonl'
  if not path.exists():
    return []
  try:
    text = path.read_bytes().decode('utf-8')
  except UnicodeDecodeError as e:
    raise WorkdirError(f'{path} is not the text of metrics records ({e}); move it away to '
                       'start its records over') from e
  lines = text.splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines) and not text.endswith('\n'):
        logging.warning('%s: its last line is cut short (a write interrupted by a kill) and is '
                        'left out: %r', path, line[:80])
        continue
      raise WorkdirError(f'{path} line {number} is not a JSON record ({e}): {line[:80]!r}') from e
    if not isinstance(record, dict):
      raise WorkdirError(f'{path} line {number} is not a JSON object: {line[:80]!r}')
    records.append(record)
  return [r for r in records if kind is None or record_kind(r) == kind]


def final_record(path: str) -> dict | None:
  """The run's final record (its test result), or None while it has none."""
  finals = read_records(path, FINAL)
  return finals[-1] if finals else None


class MetricWriter:
  """Appends records to ``metrics.jsonl`` and mirrors their scalars to TensorBoard
  (``WORKDIR/tensorboard``).

  Every record carries ``"step"``. When a run opens its workdir it calls
  :meth:`truncate_after` with the step it restored (-1: none), which drops
  the records written after it, so the file always describes one consistent
  run; TensorBoard is told to purge its events from that step on too.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True,
               upload_every_s: float = 60.0):
    """``enabled=False`` (processes other than 0 of a multi-host run) writes nothing.

    An object store (``gs://...``) cannot append, so there the writer keeps the
    run's records and uploads the whole ``metrics.jsonl`` on every write (each
    upload replaces the object at once, so a reader never sees a part), and
    writes TensorBoard's event files to a local folder, uploaded into
    ``tensorboard/`` at most every ``upload_every_s`` seconds and at
    :meth:`close`.
    """
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    self._tb_folder = None  # where the event files go (opened at the first record)
    self._purge_step = None  # TensorBoard drops the events from this step on
    self._records = None  # the file's records, where it is rewritten whole
    self._tb_upload = None  # (local folder, remote folder) of the event files
    self._upload_every_s, self._uploaded_at = upload_every_s, time.monotonic()
    if enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      tb_folder = os.path.join(workdir, 'tensorboard')
      if storage.is_object_store(workdir):
        self._records = read_records(self.path)
        if tensorboard and SummaryWriter is not None:
          self._tb_upload = (tempfile.mkdtemp(prefix='selfish_jax_tensorboard_'), tb_folder)
          tb_folder = self._tb_upload[0]
      if tensorboard and SummaryWriter is not None:
        self._tb_folder = tb_folder

  def truncate_after(self, step: int) -> None:
    """Keeps the records of steps up to ``step`` (none for -1)."""
    if not self.enabled:
      return
    records = read_records(self.path) if self._records is None else self._records
    self._rewrite([r for r in records if r.get('step', 0) <= step])
    self._purge_step = step + 1

  def _rewrite(self, records: list[dict]) -> None:
    storage.write_atomically(self.path, ''.join(json.dumps(r) + '\n' for r in records))
    if self._records is not None:
      self._records = records

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in record.items()}
    if self._records is not None:
      self._rewrite(self._records + [clean])
    else:
      with epath.Path(self.path).open('a') as f:
        f.write(json.dumps(clean) + '\n')
    if self._tb_folder is not None:
      if self._tb is None:
        self._tb = SummaryWriter(self._tb_folder, purge_step=self._purge_step)
      step = int(record['step'])
      for name, value in _flatten({k: v for k, v in record.items() if k != 'step'}).items():
        self._tb.add_scalar(name, value, step)
      if (self._tb_upload is not None
          and time.monotonic() - self._uploaded_at >= self._upload_every_s):
        self._tb.flush()
        self._upload_tensorboard()

  def _upload_tensorboard(self) -> None:
    local, remote = self._tb_upload
    for name in os.listdir(local):
      with open(os.path.join(local, name), 'rb') as f:
        storage.write_atomically(os.path.join(remote, name), f.read())
    self._uploaded_at = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      if self._tb_upload is not None:
        self._upload_tensorboard()
      self._tb = None
    if self._tb_upload is not None:
      shutil.rmtree(self._tb_upload[0], ignore_errors=True)
      self._tb_upload = None
