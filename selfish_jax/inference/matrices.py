"""One weight matrix at batch 1: ``x @ W`` and row lookups, sparse or dense,
whichever is faster for it.

Batch-1 inference is memory-bound: every weight is read once a token. A masked
matrix is kept in compressed sparse rows (``scipy.sparse.csr_matrix`` of
``W.T`` for products, of ``W`` for lookups: float32 values and int32 column
indices, 8 bytes per stored weight against 4 per dense entry), or dense where
that reads faster. Which one is measured per matrix when the model is loaded
(``kernel='auto'``): a few products each way on the matrix itself, since
the crossover density depends on its shape, the BLAS and the machine.
Measured here (RESULTS.md, Batch-1 inference): JAX's own sparse formats (BCOO,
BCSR) took 3-20 times as long as a dense product at these sizes, scipy's CSR
less than the dense one below a density of about 0.2, so CSR is the sparse
kernel.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import sparse as scipy_sparse

KERNELS = ('auto', 'sparse', 'dense')


def _timed(fn, repeats: int) -> float:
  fn()  # warm the caches and the BLAS threads
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


class Matrix:
  """A ``[in, out]`` weight matrix for batch-1 use.

  Args:
    weights: the dense float32 matrix (zero wherever ``mask`` is False).
    mask: its mask, or None for a dense matrix (always kept dense).
    kernel: ``'auto'`` (measure which is faster), ``'sparse'`` or ``'dense'``.
    lookups: whether :meth:`row` is used (an embedding), not :meth:`product`.
    rows: how many vectors :meth:`product` takes at once (the measurement's).
  """

  def __init__(self, weights: np.ndarray, mask: np.ndarray | None = None, kernel: str = 'auto',
               lookups: bool = False, rows: int = 1):
    if kernel not in KERNELS:
      raise ValueError(f'unknown kernel {kernel!r}; expected one of {KERNELS}')
    self.shape = weights.shape
    self.density = 1.0 if mask is None else float(mask.mean())
    weights = np.ascontiguousarray(weights, np.float32)
    self._dense, self._csr, self.timings = weights, None, {}
    if mask is None or kernel == 'dense':
      self.kernel = 'dense'
      return
    self._csr = scipy_sparse.csr_matrix(weights if lookups else weights.T)
    self.kernel = 'sparse'
    if kernel == 'auto':
      x = np.random.default_rng(0).standard_normal(
          (self.shape[1 if lookups else 0],) if rows == 1 else (rows, self.shape[0]), np.float32)
      use = (lambda: self.row(7 % self.shape[0])) if lookups else (lambda: self.product(x))
      repeats = max(3, min(50, int(2e7 // max(weights.size, 1))))
      self.timings['sparse'] = _timed(use, repeats)
      self.kernel = 'dense'
      self.timings['dense'] = _timed(use, repeats)
      self.kernel = 'dense' if self.timings['dense'] < self.timings['sparse'] else 'sparse'
    if self.kernel == 'sparse':
      self._dense = None  # keep one copy: the memory is half the point

  def product(self, x: np.ndarray) -> np.ndarray:
    """``x [in] @ W`` -> ``[out]``, or ``x [rows, in] @ W`` -> ``[rows, out]`` (float32)."""
    if self.kernel == 'dense':
      return x @ self._dense
    return self._csr @ x if x.ndim == 1 else (self._csr @ x.T).T

  def row(self, index: int) -> np.ndarray:
    """Row ``index`` of ``W`` (an embedding lookup)."""
    if self.kernel == 'dense':
      return self._dense[index]
    start, end = self._csr.indptr[index], self._csr.indptr[index + 1]
    row = np.zeros(self.shape[1], np.float32)
    row[self._csr.indices[start:end]] = self._csr.data[start:end]
    return row

  @property
  def nbytes(self) -> int:
    """The memory the matrix's weights take as kept."""
    if self.kernel == 'dense':
      return self._dense.nbytes
    return self._csr.data.nbytes + self._csr.indices.nbytes + self._csr.indptr.nbytes
