"""A trained sparse model in a file of its own, smaller than the dense one.

**Format** (version :data:`FORMAT_VERSION`): a NumPy ``.npz`` archive (a zip of
``.npy`` arrays, read with ``numpy.load`` alone) holding

* ``header``: the UTF-8 bytes (``uint8``) of a JSON object: ``format``
  (``"selfish_jax.export"``), ``version``, ``config`` (the run's
  ``config.json``), ``vocab`` (the words, in id order) and ``leaves``: one
  entry per parameter with its ``path`` (the keys from the parameter tree's
  root), ``shape``, ``storage`` (``"dense"``, ``"indices"`` or ``"bitmap"``),
  ``dtype`` of its values (``"float32"`` or ``"bfloat16"``) and, for a sparse
  leaf, ``count`` (its stored entries) and ``index_dtype``;
* ``<i>.values``: leaf ``i``'s values: every entry of a dense leaf; of a
  sparse one the nonzero entries in row-major order. bfloat16 values are
  stored as the ``uint16`` of their bits (the high half of the float32's);
* ``<i>.indices``: a sparse leaf's flat positions, in the smallest unsigned
  integer type that holds them, or ``<i>.bitmap``: its mask, flattened and
  packed eight entries a byte (``numpy.packbits``, big-endian bit order),
  whichever is smaller.

Masked matrices are stored sparse (their nonzero entries: an active weight
that is exactly zero contributes nothing); biases and the matrices of a dense
run are stored dense. The weights are the run's best on validation: the
averaged ones where SNT-ASGD averaged.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from typing import Any

from etils import epath
import numpy as np

from selfish_jax import storage
from selfish_jax.errors import UserError

PyTree = Any

FORMAT = 'selfish_jax.export'
FORMAT_VERSION = 1
VALUE_DTYPES = ('float32', 'bfloat16')


class ExportError(UserError):
  """An export file that cannot be read, or a run that cannot be exported."""


def _index_dtype(size: int) -> np.dtype:
  for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
    if size - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f'no index type holds {size} positions')


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
  """Round-to-nearest-even bfloat16 of float32 ``values``, as uint16 bits."""
  bits = values.astype(np.float32).view(np.uint32)
  rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
  return (rounded >> 16).astype(np.uint16)


def _from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
  return (bits.astype(np.uint32) << 16).view(np.float32)


def flatten_tree(tree: dict, path: tuple = ()) -> list[tuple[tuple[str, ...], Any]]:
  """``[(path of keys, leaf), ...]`` of nested dicts, keys sorted at every level."""
  leaves = []
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, dict):
      leaves += flatten_tree(value, path + (key,))
    else:
      leaves.append((path + (key,), value))
  return leaves


def unflatten_tree(leaves: list[tuple[tuple[str, ...], Any]]) -> dict:
  """The nested dicts :func:`flatten_tree` flattened."""
  tree: dict = {}
  for path, value in leaves:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def write_export(path: str, params: dict, sparse: set[tuple[str, ...]], config: dict,
                 vocab: list[str], dtype: str = 'float32') -> dict:
  """Writes ``params`` (nested dicts of arrays) to ``path`` in the export format,
  the leaves whose path is in ``sparse`` as their nonzero entries; returns the
  header. The file appears whole or not at all."""
  if dtype not in VALUE_DTYPES:
    raise ExportError(f'unknown value dtype {dtype!r}; expected one of {VALUE_DTYPES}')
  arrays, leaves = {}, []
  for i, (leaf_path, value) in enumerate(flatten_tree(params)):
    value = np.asarray(value, np.float32)
    entry = {'path': list(leaf_path), 'shape': list(value.shape), 'dtype': dtype}
    if leaf_path in sparse:
      flat = value.ravel()
      positions = np.flatnonzero(flat)
      index_dtype = _index_dtype(flat.size)
      bitmap_bytes = -(-flat.size // 8)
      entry.update(count=int(positions.size), index_dtype=index_dtype.name)
      if bitmap_bytes < positions.size * index_dtype.itemsize:
        entry['storage'] = 'bitmap'
        arrays[f'{i}.bitmap'] = np.packbits(flat != 0)
      else:
        entry['storage'] = 'indices'
        arrays[f'{i}.indices'] = positions.astype(index_dtype)
      stored = flat[positions]
    else:
      entry['storage'] = 'dense'
      stored = value
    arrays[f'{i}.values'] = _to_bfloat16_bits(stored) if dtype == 'bfloat16' else stored
    leaves.append(entry)
  header = {'format': FORMAT, 'version': FORMAT_VERSION, 'config': config, 'vocab': list(vocab),
            'leaves': leaves}
  arrays['header'] = np.frombuffer(json.dumps(header).encode('utf-8'), np.uint8)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  storage.write_atomically(path, buffer.getvalue())
  return header


@dataclasses.dataclass(frozen=True)
class Export:
  """A loaded export: the run's config, its vocabulary, and its parameters as
  dense float32 arrays (zeros where a sparse leaf stores nothing), with the
  mask of every leaf stored sparse."""
  path: str
  config: dict
  vocab: tuple[str, ...]
  params: dict  # nested dicts of float32 numpy arrays
  masks: dict  # like params: a bool array for every sparse leaf, None for the dense ones
  header: dict

  @property
  def family(self) -> str:
    return self.config.get('model', 'lstm')


def load_export(path: str) -> Export:
  """Reads an export written by :func:`write_export` (any version up to
  :data:`FORMAT_VERSION`).

  Raises:
    ExportError: the file is missing, damaged, not an export, or of a newer
      format version; the message names the file.
  """
  try:
    data = epath.Path(path).read_bytes()
  except OSError as e:
    raise ExportError(f'cannot read the export {path} ({type(e).__name__}: {e})') from e
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
      arrays = {name: archive[name] for name in archive.files}
    header = json.loads(arrays['header'].tobytes().decode('utf-8'))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
    raise ExportError(f'{path} is not a readable selfish_jax export (it is damaged or cut '
                      f'short: {type(e).__name__}: {e})') from e
  if not isinstance(header, dict) or header.get('format') != FORMAT:
    raise ExportError(f'{path} is not a selfish_jax export (its header names no {FORMAT!r})')
  version = header.get('version')
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ExportError(f'{path} is export format version {version}; this selfish_jax reads '
                      f'versions up to {FORMAT_VERSION}: upgrade it to read the file')
  params, masks = [], []
  try:
    for i, entry in enumerate(header['leaves']):
      leaf_path, shape = tuple(entry['path']), tuple(entry['shape'])
      values = arrays[f'{i}.values']
      if entry['dtype'] == 'bfloat16':
        values = _from_bfloat16_bits(values)
      size = int(np.prod(shape))
      if entry['storage'] == 'dense':
        params.append((leaf_path, values.astype(np.float32).reshape(shape)))
        masks.append((leaf_path, None))
        continue
      if entry['storage'] == 'bitmap':
        mask = np.unpackbits(arrays[f'{i}.bitmap'], count=size).astype(bool)
      else:
        mask = np.zeros(size, bool)
        mask[arrays[f'{i}.indices'].astype(np.int64)] = True
      if int(mask.sum()) != entry['count'] or values.size != entry['count']:
        raise ValueError(f'leaf {"/".join(leaf_path)} stores {values.size} values for '
                         f'{int(mask.sum())} positions, its header says {entry["count"]}')
      dense = np.zeros(size, np.float32)
      dense[mask] = values
      params.append((leaf_path, dense.reshape(shape)))
      masks.append((leaf_path, mask.reshape(shape)))
  except (KeyError, ValueError, IndexError, TypeError) as e:
    raise ExportError(f'{path} is a damaged selfish_jax export ({type(e).__name__}: {e})') from e
  return Export(path, header['config'], tuple(header['vocab']), unflatten_tree(params),
                unflatten_tree(masks), header)


def masked_paths(masks: dict) -> set[tuple[str, ...]]:
  """The paths of the leaves a mask tree (nested dicts, None for dense leaves) masks."""
  return {path for path, mask in flatten_tree(masks) if mask is not None}


def dense_bytes(header: dict) -> int:
  """What an export's parameters take as dense float32 arrays (what a checkpoint
  stores of them), from its header."""
  return sum(4 * int(np.prod(entry['shape'])) for entry in header['leaves'])


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A run's best weights with what reads them: its validated config, corpus and model."""
  config: Any  # ml_collections.ConfigDict
  corpus: Any  # selfish_jax.data.Corpus
  model: Any  # selfish_jax.models.LanguageModel
  params: PyTree  # the best weights (averaged where SNT-ASGD averaged)
  masked: set  # paths of the leaves the run masks


def load_trained_run(workdir: str) -> TrainedRun:
  """The best weights of the run in ``workdir``, its config, corpus (loaded
  from the config's ``data_dir``) and model.

  Raises:
    UserError: no run there, no best weights yet, or unreadable ones (one line).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from selfish_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from selfish_jax import models  # pylint: disable=g-import-not-at-top
  from selfish_jax.data import load_corpus  # pylint: disable=g-import-not-at-top
  from selfish_jax.training.checkpoint import Checkpoints  # pylint: disable=g-import-not-at-top
  from selfish_jax.training.workdir import read_config  # pylint: disable=g-import-not-at-top

  saved = read_config(workdir)
  if saved is None:
    raise ExportError(f'no training run in {workdir} (it has no config.json)')
  config = config_lib.default_config()
  config.update(saved)
  config_lib.validate(config)
  corpus = load_corpus(config.dataset, config.data_dir, allow_download=config.download,
                       base_url=config.download_url or None)
  model = models.build_model(config, corpus.vocab_size)
  like = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    params = checkpoints.restore_best(like)
    masks = checkpoints.latest_masks()
  finally:
    checkpoints.close()
  if params is None:
    raise ExportError(f'{workdir} has no best weights yet (no epoch finished)')
  params = jax.device_get(params)
  masked = masked_paths(masks or {})
  return TrainedRun(config, corpus, model, params, masked)


def export_run(workdir: str, out: str, dtype: str = 'float32') -> dict:
  """Exports the best weights of the run in ``workdir`` to ``out``; returns the
  header with the file's ``bytes`` and the ``dense_bytes`` of its parameters."""
  from selfish_jax.training.workdir import as_saved  # pylint: disable=g-import-not-at-top
  run = load_trained_run(workdir)
  header = write_export(out, run.params, run.masked, as_saved(run.config),
                        list(run.corpus.vocab), dtype)
  header['bytes'] = epath.Path(out).stat().length
  header['dense_bytes'] = dense_bytes(header)
  return header
