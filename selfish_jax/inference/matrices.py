"""One weight matrix at batch 1: ``x @ W`` and row lookups, in whichever of
three layouts is fastest for it.

Batch-1 inference reads every weight once a token. A masked matrix can be kept
(:mod:`~selfish_jax.inference.kernels` has the two sparse ones and their SIMD
products)

* ``'bitmap'``: a mask bit an entry and the active values (no gather),
* ``'csr'``: compressed sparse rows, 16-bit columns (a gather a stored weight),
* ``'dense'``: the float32 matrix (its product numba's too, where numba is:
  as fast as BLAS's ``sgemv`` here, and BLAS's threads spin-wait on the cores
  numba's need, which made a mixed engine up to 20 times slower).

Which one is measured per matrix when the model is loaded (``kernel='auto'``):
products (or lookups) on the matrix itself in each layout, since the
crossovers depend on its shape, its density, the CPU and the BLAS. Measured
here (RESULTS.md, Batch-1 inference), one 3000x6000 product on two AVX-512
cores: dense 1.3-1.7 ms; bitmap 0.57 / 0.49 / 0.49 ms at densities 0.33 / 0.1 /
0.05; csr 1.14 / 0.37 / 0.20 ms (scipy's CSR 4.9 / 1.4 / 0.6 ms). JAX's own
sparse formats (BCOO, BCSR) took 3-20 times as long as a dense product.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from selfish_jax.inference import kernels

KERNELS = ('auto', 'bitmap', 'csr', 'dense')
_ROUNDS = 2  # each layout timed twice, interleaved, and its best round kept


class Matrix:
  """A ``[in, out]`` weight matrix for batch-1 use.

  Args:
    weights: the dense float32 matrix (zero wherever ``mask`` is False).
    mask: its mask, or None for a dense matrix (always kept dense).
    kernel: one of :data:`KERNELS`: ``'auto'`` measures which layout is fastest.
    lookups: whether :meth:`row` is used (an embedding), not :meth:`product`.
    rows: how many vectors :meth:`product` takes at once (the measurement's).
  """

  def __init__(self, weights: np.ndarray, mask: np.ndarray | None = None, kernel: str = 'auto',
               lookups: bool = False, rows: int = 1):
    if kernel not in KERNELS:
      raise ValueError(f'unknown kernel {kernel!r}; expected one of {KERNELS}')
    if kernel in ('bitmap', 'csr') and not kernels.available():
      raise ValueError(f'kernel {kernel!r} needs numba (pip install numba)')
    self.shape = weights.shape
    self.density = 1.0 if mask is None else float(mask.mean())
    self.timings: dict[str, float] = {}
    weights = np.ascontiguousarray(weights, np.float32)
    if mask is None:
      kernel = 'dense'
    if kernel == 'auto':
      candidates = list(KERNELS[1:]) if kernels.available() else ['dense']
    else:
      candidates = [kernel]
    # Products multiply by W.T's rows; lookups read W's.
    row_weights = weights if lookups else weights.T
    row_mask = None if mask is None else (mask if lookups else mask.T)
    layouts = {name: self._build(name, row_weights, row_mask) for name in candidates}
    if len(candidates) > 1:
      self.timings = self._measure(layouts, lookups, rows)
      self.kernel = min(self.timings, key=self.timings.get)
    else:
      self.kernel = candidates[0]
    self._kept = layouts[self.kernel]  # one layout only: the memory is half the point

  @staticmethod
  def _build(name: str, row_weights: np.ndarray, mask: np.ndarray | None):
    if name == 'dense':
      return np.ascontiguousarray(row_weights)
    build = kernels.bitmap_rows if name == 'bitmap' else kernels.compressed_rows
    return build(row_weights, np.asarray(mask, bool))

  def _measure(self, layouts: dict, lookups: bool, rows: int) -> dict[str, float]:
    x = np.random.default_rng(0).standard_normal(
        (self.shape[1 if lookups else 0],) if rows == 1 else (rows, self.shape[0]), np.float32)
    size = int(np.prod(self.shape))
    repeats = max(3, min(50, int(2e7 // max(size, 1))))
    best = {}
    for _ in range(_ROUNDS):
      for name, layout in layouts.items():
        if lookups:
          use = functools.partial(self._row, name, layout, 7 % self.shape[0])
        else:
          use = functools.partial(self._product, name, layout, x)
        use()  # warm the caches, the threads, the compiler
        start = time.perf_counter()
        for _ in range(repeats):
          use()
        best[name] = min(best.get(name, np.inf), (time.perf_counter() - start) / repeats)
    return best

  @staticmethod
  def _product(kernel: str, layout, x: np.ndarray) -> np.ndarray:
    if x.ndim == 1:
      return kernels.product(layout, x)
    return np.stack([kernels.product(layout, vector) for vector in x])

  @staticmethod
  def _row(kernel: str, layout, index: int) -> np.ndarray:
    return layout[index] if kernel == 'dense' else kernels.row(layout, index)

  def product(self, x: np.ndarray) -> np.ndarray:
    """``x [in] @ W`` -> ``[out]``, or ``x [rows, in] @ W`` -> ``[rows, out]`` (float32)."""
    return self._product(self.kernel, self._kept, x)

  def row(self, index: int) -> np.ndarray:
    """Row ``index`` of ``W`` (an embedding lookup)."""
    return self._row(self.kernel, self._kept, index)

  @property
  def nbytes(self) -> int:
    """The memory the matrix's weights take as kept."""
    return self._kept.nbytes
