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

Which one is measured per matrix when the model is loaded (``kernel='auto'``,
:func:`choose_layouts`): products (or lookups) in each layout, in passes over
the model's matrices as a step reads them, since the crossovers depend on the
shape, the density, the cache, the CPU. Measured here (RESULTS.md, Batch-1
inference), one 3000x6000 product on two AVX-512 cores: dense 1.3-1.7 ms;
bitmap 0.57 / 0.49 / 0.49 ms at densities 0.33 / 0.1 / 0.05; csr 1.14 / 0.37 /
0.20 ms (scipy's CSR 4.9 / 1.4 / 0.6 ms). JAX's own sparse formats (BCOO,
BCSR) took 3-20 times as long as a dense product.
"""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np

from selfish_jax.inference import kernels

KERNELS = ('auto', 'bitmap', 'csr', 'dense')
_ROUNDS, _PASSES = 2, 5  # rounds over the layouts (this CPU drifts), timed passes a layout a round


class Matrix:
  """A ``[in, out]`` weight matrix for batch-1 use.

  Args:
    weights: the dense float32 matrix (zero wherever ``mask`` is False).
    mask: its mask, or None for a dense matrix (always kept dense).
    kernel: one of :data:`KERNELS`: ``'auto'`` measures which layout is fastest.
    lookups: whether :meth:`row` is used (an embedding), not :meth:`product`.
    rows: how many vectors :meth:`product` takes at once (the measurement's).
    choose: with ``'auto'``, measure now, the matrix alone; False leaves it to
      :func:`choose_layouts` over the model's matrices (or to the first use).
  """

  def __init__(self, weights: np.ndarray, mask: np.ndarray | None = None, kernel: str = 'auto',
               lookups: bool = False, rows: int = 1, choose: bool = True):
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
    self._layouts = {name: self._build(name, row_weights, row_mask) for name in candidates}
    self._example = (7 % self.shape[0] if lookups else np.random.default_rng(0).standard_normal(
        (self.shape[0],) if rows == 1 else (rows, self.shape[0]), np.float32))
    self._lookups, self.kernel, self._kept = lookups, 'auto', None
    if len(candidates) == 1:
      self._keep(candidates[0])
    elif choose:
      choose_layouts([self])

  @staticmethod
  def _build(name: str, row_weights: np.ndarray, mask: np.ndarray | None):
    if name == 'dense':
      return np.ascontiguousarray(row_weights)
    build = kernels.bitmap_rows if name == 'bitmap' else kernels.compressed_rows
    return build(row_weights, np.asarray(mask, bool))

  def _keep(self, kernel: str) -> None:
    self.kernel, self._kept = kernel, self._layouts[kernel]
    self._layouts = None  # one layout only: the memory is half the point

  def _use(self, kernel: str) -> None:
    """One product (or lookup) of the measurement's example in layout ``kernel``."""
    if self._lookups:
      kernels.row(self._layouts[kernel], self._example)
    else:
      self._product(self._layouts[kernel], self._example)

  @property
  def undecided(self) -> tuple[str, ...]:
    """The layouts still measured against each other (none once one is kept)."""
    return () if self._layouts is None else tuple(self._layouts)

  @staticmethod
  def _product(layout, x: np.ndarray) -> np.ndarray:
    if x.ndim == 1:
      return kernels.product(layout, x)
    return np.stack([kernels.product(layout, vector) for vector in x])

  def _layout(self):
    """The kept layout (measured first, alone, if no one chose it yet)."""
    if self._layouts is not None:
      choose_layouts([self])
    return self._kept

  def product(self, x: np.ndarray) -> np.ndarray:
    """``x [in] @ W`` -> ``[out]``, or ``x [rows, in] @ W`` -> ``[rows, out]`` (float32)."""
    return self._product(self._layout(), x)

  def row(self, index: int) -> np.ndarray:
    """Row ``index`` of ``W`` (an embedding lookup)."""
    return kernels.row(self._layout(), index)

  @property
  def nbytes(self) -> int:
    """The memory the matrix's weights take as kept."""
    return self._layout().nbytes


def choose_layouts(matrices: Iterable[Matrix]) -> None:
  """Keeps each matrix's fastest layout, timed as a model's step reads its matrices.

  For one layout at a time, passes over every undecided matrix in order, one
  product (or lookup) each, timed alone: each finds the caches as the other
  matrices left them, as in generation, where a model larger than the cache
  streams from memory and a small one stays in it. Timing one matrix over and
  over instead keeps it in the cache: a 2x650 LSTM's matrices (6.8 MB each)
  then measured faster dense, though from memory the bitmap took half the time.
  A matrix's time in a layout is the median of its passes.
  """
  undecided = [matrix for matrix in matrices if matrix.undecided]
  samples = [{name: [] for name in matrix.undecided} for matrix in undecided]
  for _ in range(_ROUNDS):
    for name in KERNELS[1:]:
      using = [(matrix, times[name]) for matrix, times in zip(undecided, samples)
               if name in times]
      for timed in range(-1, _PASSES):  # pass -1 warms the caches, the threads, the compiler
        for matrix, times in using:
          start = time.perf_counter()
          matrix._use(name)  # pylint: disable=protected-access
          if timed >= 0:
            times.append(time.perf_counter() - start)
  for matrix, times in zip(undecided, samples):
    matrix.timings = {name: float(np.median(values)) for name, values in times.items()}
    matrix._keep(min(matrix.timings, key=matrix.timings.get))  # pylint: disable=protected-access
