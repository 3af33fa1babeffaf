"""Checksummed, atomic downloads into the data cache."""

from __future__ import annotations

import gzip
import hashlib
import urllib.error
import urllib.request

from selfish_jax import storage
from selfish_jax.errors import DataError


def fetch(url: str, path: str, *, sha256: str, timeout_s: float = 60.0) -> str:
  """Downloads ``url`` to ``path`` if the content's sha256 matches.

  A ``.gz`` response (by URL suffix) is decompressed first; the checksum is of
  the decompressed text. The file appears at ``path`` only when complete and
  verified (:func:`~selfish_jax.storage.write_atomically`; ``path`` may be in an
  object store), so an interrupted or corrupt download never leaves a file
  that later passes for data.

  Returns:
    ``path``.
  """
  try:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
      payload = response.read()
  except (urllib.error.URLError, OSError, ValueError) as e:
    raise DataError(f'download of {url} failed: {e}') from e
  if url.endswith('.gz'):
    try:
      payload = gzip.decompress(payload)
    except (OSError, EOFError) as e:
      raise DataError(f'download of {url} is not valid gzip: {e}') from e
  digest = hashlib.sha256(payload).hexdigest()
  if digest != sha256:
    raise DataError(f'checksum mismatch for download {url}: sha256 {digest}, expected {sha256}')
  try:
    storage.write_atomically(path, payload)
  except OSError as e:
    raise DataError(f'cannot write {path}: {e}') from e
  return path
