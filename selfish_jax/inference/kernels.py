"""Batch-1 products ``W @ x`` over two sparse layouts of ``W``'s rows, with SIMD.

A batch-1 product reads every stored weight once, so what a stored weight
costs decides whether sparse beats a dense ``sgemv`` (about 10 G entries/s on
two cores here). scipy's CSR product costs one scalar gather of ``x[column]``
and one dependent add a weight (about 1.2 G weights/s on one core): slower
than dense above a density of about 0.1. Two layouts do better:

* :class:`BitmapRows`: each row cut into blocks of 16 columns, a block one
  16-bit mask word plus its active values back to back. A block's product
  expands the values into their 16 lanes (AVX-512 ``vexpandps``) and
  multiplies them by 16 consecutive entries of ``x``: no gather, dense SIMD
  work on 1 bit plus ``4 x density`` bytes an entry. Its cost hardly depends
  on the density; it wins at moderate densities (0.33: 2-4x a dense product).
* :class:`CompressedRows`: CSR with the smallest column type (uint16 up to
  65,536 columns) whose product gathers 16 entries of ``x`` at a time
  (AVX-512 ``vgatherdps``): 6 bytes a stored weight, a cost proportional to
  the density; it wins at low densities (0.1 and below). The gather is its
  limit: on AMD Zen 4 a 16-lane gather takes about 20 cycles, three times the
  rest of the loop (measured by replacing it with a plain load).

The dense product is here too, in numba: as fast as BLAS's ``sgemv`` here, and
an engine that mixed the two had BLAS's threads spin-waiting on the cores
numba's threads need.

The kernels are LLVM IR compiled by numba (numba has no vector types, hence the
``@intrinsic``s) on first use, about a second each, and split the rows over
numba's threads. Without AVX-512 they fall back to portable code (LLVM's
``masked.expandload``; a scalar loop with four sums): correct, slower;
:class:`~selfish_jax.inference.matrices.Matrix` measures before it uses one.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import numpy as np

try:
  import numba
  from llvmlite import ir
  from numba import types
  from numba.core import cgutils
  from numba.extending import intrinsic
except ImportError:  # the sparse kernels are optional: Matrix then keeps every matrix dense
  numba = None

LANES = 16  # float32 lanes of an AVX-512 register: a bitmap block, a gather
UNROLL = 4  # bitmap blocks a loop iteration handles, each into its own sum
_ALIGN = LANES * UNROLL


def available() -> bool:
  """Whether the sparse kernels can run here (numba is installed)."""
  return numba is not None


class BitmapRows(NamedTuple):
  """The rows of a ``[rows, columns]`` matrix as mask words and active values.

  Attributes:
    values: float32 ``[active + 16]``, the active entries row by row in column
      order, then 16 zeros (a block's 16-lane load may run past the last value).
    row_start: int64 ``[rows + 1]``: where each row's values start.
    words: uint16 ``[rows, blocks]``: bit ``j`` of word ``b`` is column
      ``16 b + j``; inactive columns pad a row to whole loop iterations.
    columns: the matrix's columns before padding.
  """
  values: np.ndarray
  row_start: np.ndarray
  words: np.ndarray
  columns: int

  @property
  def padded_columns(self) -> int:
    return self.words.shape[1] * LANES

  @property
  def nbytes(self) -> int:
    return self.values.nbytes + self.row_start.nbytes + self.words.nbytes


class CompressedRows(NamedTuple):
  """Compressed sparse rows with the smallest column type.

  Attributes:
    values: float32 ``[active]``, row by row in column order.
    columns_of: uint16 (or int32 past 65,536 columns) ``[active]``.
    row_start: int64 ``[rows + 1]``.
    columns: the matrix's columns.
  """
  values: np.ndarray
  columns_of: np.ndarray
  row_start: np.ndarray
  columns: int

  @property
  def nbytes(self) -> int:
    return self.values.nbytes + self.columns_of.nbytes + self.row_start.nbytes


def _row_start(mask: np.ndarray) -> np.ndarray:
  row_start = np.zeros(mask.shape[0] + 1, np.int64)
  np.cumsum(mask.sum(axis=1), out=row_start[1:])
  return row_start


def bitmap_rows(weights: np.ndarray, mask: np.ndarray) -> BitmapRows:
  """The entries of ``weights [rows, columns]`` where ``mask``, as :class:`BitmapRows`."""
  rows, columns = weights.shape
  active = np.zeros((rows, -(-columns // _ALIGN) * _ALIGN), bool)
  active[:, :columns] = mask
  words = np.packbits(active.reshape(rows, -1, LANES), axis=-1, bitorder='little')
  words = np.ascontiguousarray(words).view('<u2').reshape(rows, -1).astype(np.uint16)
  values = np.concatenate([np.asarray(weights, np.float32)[mask], np.zeros(LANES, np.float32)])
  return BitmapRows(values, _row_start(mask), words, columns)


def compressed_rows(weights: np.ndarray, mask: np.ndarray) -> CompressedRows:
  """The entries of ``weights [rows, columns]`` where ``mask``, as :class:`CompressedRows`."""
  columns = weights.shape[1]
  column_type = np.uint16 if columns <= 1 << 16 else np.int32
  columns_of = np.nonzero(mask)[1].astype(column_type)
  return CompressedRows(np.asarray(weights, np.float32)[mask], columns_of, _row_start(mask),
                        columns)


def row(matrix: np.ndarray | BitmapRows | CompressedRows, index: int) -> np.ndarray:
  """Row ``index`` as a dense float32 vector (an embedding lookup); of a dense
  ``[rows, columns]`` array, a view of it."""
  if isinstance(matrix, np.ndarray):
    return matrix[index]
  start, end = matrix.row_start[index], matrix.row_start[index + 1]
  if isinstance(matrix, BitmapRows):
    where = np.unpackbits(matrix.words[index].astype('<u2').view(np.uint8),
                          bitorder='little')[:matrix.columns].astype(bool)
  else:
    where = matrix.columns_of[start:end]
  out = np.zeros(matrix.columns, np.float32)
  out[where] = matrix.values[start:end]
  return out


def product(matrix: np.ndarray | BitmapRows | CompressedRows, x: np.ndarray,
            portable: bool = False) -> np.ndarray:
  """``W @ x`` for ``x [columns]`` -> float32 ``[rows]``.

  Args:
    matrix: ``W``: a dense float32 ``[rows, columns]`` array, :class:`BitmapRows`
      or :class:`CompressedRows`.
    x: the vector.
    portable: the portable code even where AVX-512 is there (for tests).
  """
  if isinstance(matrix, np.ndarray):
    if numba is None:
      return matrix @ x
    # numba's, not BLAS's sgemv (as fast here): in an engine mixing the two, BLAS's threads
    # spin-waited on the cores numba's threads needed, up to 20x slower.
    out = np.empty(matrix.shape[0], np.float32)
    _dense_kernel(_threads_here())(matrix, np.ascontiguousarray(x, np.float32), out)
    return out
  portable, threads = portable or not _has_avx512(), _threads_here()
  out = np.empty(matrix.row_start.shape[0] - 1, np.float32)
  if isinstance(matrix, BitmapRows):
    padded = np.zeros(matrix.padded_columns, np.float32)
    padded[:matrix.columns] = x
    _bitmap_kernel(portable, threads)(matrix.values, matrix.words, matrix.row_start, padded, out)
  else:
    _compressed_kernel(portable, threads)(
        matrix.values, matrix.columns_of, matrix.row_start, np.ascontiguousarray(x, np.float32), out)
  return out


@functools.cache
def _has_avx512() -> bool:
  # numba compiles for this host unless told another CPU, which may lack the intrinsics.
  if numba is None or numba.config.CPU_NAME not in (None, 'host'):
    return False
  from llvmlite import binding  # pylint: disable=g-import-not-at-top
  return bool(binding.get_host_cpu_features().get('avx512f', False))


@functools.cache
def _first_product_pid() -> int:
  """The process whose first product started numba's threads (a fork copies the answer)."""
  return os.getpid()


def _threads_here() -> bool:
  """Whether products may use numba's threads in this process.

  Not in a process forked after they started: numba's OpenMP pool does not
  survive a fork, and a child that used it aborted ("fork() called from a
  process already using GNU OpenMP") while a ``multiprocessing`` pool waited
  for it forever. Such a child multiplies on one thread instead; one forked
  before any product starts its own threads.
  """
  return _first_product_pid() == os.getpid()


def _over_rows(row_dot: Callable, threads: bool) -> Callable:
  """``kernel(a, b, row_start, x, out)``: ``out[r] = row_dot(a, b, start, end, r, x)``
  for every row, the rows split over numba's threads if ``threads``."""

  @numba.njit(parallel=threads, boundscheck=False, nogil=True)
  def kernel(first, second, row_start, x, out):
    for r in numba.prange(out.shape[0]):  # pylint: disable=not-an-iterable
      out[r] = row_dot(first, second, row_start[r], row_start[r + 1], r, x)

  return kernel


@functools.cache
def _dense_kernel(threads: bool) -> Callable:
  """``kernel(rows, x, out)``: a dense product; reassociation lets LLVM vectorise the sum."""

  @numba.njit(parallel=threads, boundscheck=False, nogil=True, fastmath={'reassoc', 'contract'})
  def kernel(rows, x, out):
    for r in numba.prange(rows.shape[0]):  # pylint: disable=not-an-iterable
      total = np.float32(0.0)
      for c in range(rows.shape[1]):
        total += rows[r, c] * x[c]
      out[r] = total

  return kernel


@functools.cache
def _bitmap_kernel(portable: bool, threads: bool) -> Callable:
  """``kernel(values, words, row_start, x, out)``, compiled once a process."""
  return _over_rows(_bitmap_row_dot(portable), threads)


@functools.cache
def _compressed_kernel(portable: bool, threads: bool) -> Callable:
  """``kernel(values, columns_of, row_start, x, out)``, compiled once a process."""
  if portable:
    return _over_rows(_scalar_row_dot, threads)
  return _over_rows(_gather_row_dot(), threads)


# ---- LLVM IR: one row's dot product ----------------------------------------------------------


class _IR:
  """The types and intrinsics a row's dot product uses, in one function being built."""

  def __init__(self, context, builder, signature, args):
    self.builder = builder
    self.data = [context.make_array(t)(context, builder, a).data if isinstance(t, types.Array)
                 else a for t, a in zip(signature.args, args)]
    self.f32, self.i32, self.i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    self.lanes = ir.VectorType(self.f32, LANES)
    self.bits = ir.VectorType(ir.IntType(1), LANES)
    self.zero = ir.Constant(self.lanes, None)
    self.fma_ = self.declare('llvm.fma.v16f32', self.lanes, self.lanes, self.lanes, self.lanes)

  def declare(self, name, result, *arguments):
    return cgutils.get_or_insert_function(self.builder.module,
                                          ir.FunctionType(result, arguments), name)

  def i64_const(self, value: int):
    return ir.Constant(self.i64, value)

  def load_lanes(self, pointer):
    """16 float32 from ``pointer`` (aligned to 4 bytes only)."""
    return self.builder.load(self.builder.bitcast(pointer, self.lanes.as_pointer()), align=4)

  def fma(self, a, b, total) -> None:
    self.builder.store(self.builder.call(self.fma_, [a, b, self.builder.load(total)]), total)

  def sum_of(self, totals):
    """The sum of every lane of every ``totals`` (pairwise, as a tree)."""
    builder = self.builder
    partial = [builder.load(total) for total in totals]
    while len(partial) > 1:
      partial = [builder.fadd(a, b) for a, b in zip(partial[::2], partial[1::2])]
    total, width = partial[0], LANES
    while width > 1:
      width //= 2
      total = builder.fadd(*[builder.shuffle_vector(total, total, ir.Constant(
          ir.VectorType(self.i32, width), list(range(first, first + width))))
                             for first in (0, width)])
    return builder.extract_element(total, ir.Constant(self.i32, 0))


def _bitmap_row_dot(portable: bool):

  @intrinsic
  def row_dot(typingctx, values, words, start, end, r, x):
    del typingctx  # a bitmap row's extent is its words, not ``end``

    def codegen(context, builder, signature, args):
      irb = _IR(context, builder, signature, args)
      values_at, words_at, start, _, r, x_at = irb.data
      if portable:
        expandload = irb.declare('llvm.masked.expandload.v16f32', irb.lanes,
                                 irb.f32.as_pointer(), irb.bits, irb.lanes)
        expand = lambda at, word: builder.call(expandload, [at, word, irb.zero])
      else:
        # The register form: on AMD Zen 4 the memory form of vexpandps is much slower.
        register = irb.declare('llvm.x86.avx512.mask.expand.v16f32', irb.lanes,
                               irb.lanes, irb.lanes, irb.bits)
        expand = lambda at, word: builder.call(register, [irb.load_lanes(at), irb.zero, word])
      popcount = irb.declare('llvm.ctpop.i16', ir.IntType(16), ir.IntType(16))
      words_array = context.make_array(signature.args[1])(context, builder, args[1])
      blocks = cgutils.unpack_tuple(builder, words_array.shape)[1]
      first_word = builder.mul(r, blocks)
      totals = [cgutils.alloca_once_value(builder, irb.zero) for _ in range(UNROLL)]
      offset = cgutils.alloca_once_value(builder, start)
      with cgutils.for_range(builder, builder.udiv(blocks, irb.i64_const(UNROLL))) as loop:
        at = builder.load(offset)
        for u, total in enumerate(totals):
          block = builder.add(builder.mul(loop.index, irb.i64_const(UNROLL)), irb.i64_const(u))
          word = builder.load(builder.gep(words_at, [builder.add(first_word, block)]))
          active = expand(builder.gep(values_at, [at]), builder.bitcast(word, irb.bits))
          x_lanes = irb.load_lanes(builder.gep(x_at, [builder.mul(block, irb.i64_const(LANES))]))
          irb.fma(active, x_lanes, total)
          at = builder.add(at, builder.zext(builder.call(popcount, [word]), irb.i64))
        builder.store(at, offset)
      return irb.sum_of(totals)

    return types.float32(values, words, start, end, r, x), codegen

  return row_dot


def _gather_row_dot():

  @intrinsic
  def row_dot(typingctx, values, columns_of, start, end, r, x):
    del typingctx  # ``r``: a compressed row's extent is start and end

    def codegen(context, builder, signature, args):
      irb = _IR(context, builder, signature, args)
      values_at, columns_at, start, end, _, x_at = irb.data
      column_type = ir.IntType(np.dtype(signature.args[1].dtype.name).itemsize * 8)
      column_lanes = ir.VectorType(column_type, LANES)
      index_lanes = ir.VectorType(irb.i32, LANES)
      i8_at = ir.IntType(8).as_pointer()
      gather = irb.declare('llvm.x86.avx512.mask.gather.dps.512', irb.lanes, irb.lanes, i8_at,
                           index_lanes, irb.bits, irb.i32)
      masked_load = lambda vector_type, name: irb.declare(
          name, vector_type, vector_type.as_pointer(), irb.i32, irb.bits, vector_type)
      load_values = masked_load(irb.lanes, 'llvm.masked.load.v16f32.p0v16f32')
      load_columns = masked_load(
          column_lanes, f'llvm.masked.load.v16i{column_type.width}.p0v16i{column_type.width}')
      x_bytes = builder.bitcast(x_at, i8_at)
      lane = ir.Constant(ir.VectorType(irb.i64, LANES), list(range(LANES)))
      totals = [cgutils.alloca_once_value(builder, irb.zero) for _ in range(2)]

      def chunk(at, lanes_on, total):  # 16 stored weights from ``at``; lanes_on: which exist
        cast = lambda pointer, vector_type: builder.bitcast(pointer, vector_type.as_pointer())
        columns = builder.call(load_columns, [
            cast(builder.gep(columns_at, [at]), column_lanes), ir.Constant(irb.i32, 2),
            lanes_on, ir.Constant(column_lanes, None)])
        columns = (builder.zext(columns, index_lanes) if column_type.width < 32 else columns)
        gathered = builder.call(gather, [irb.zero, x_bytes, columns, lanes_on,
                                         ir.Constant(irb.i32, 4)])
        weights = builder.call(load_values, [cast(builder.gep(values_at, [at]), irb.lanes),
                                             ir.Constant(irb.i32, 4), lanes_on, irb.zero])
        irb.fma(weights, gathered, total)

      every_lane = ir.Constant(irb.bits, [1] * LANES)
      count = builder.sub(end, start)
      with cgutils.for_range(builder, builder.udiv(count, irb.i64_const(2 * LANES))) as loop:
        at = builder.add(start, builder.mul(loop.index, irb.i64_const(2 * LANES)))
        chunk(at, every_lane, totals[0])
        chunk(builder.add(at, irb.i64_const(LANES)), every_lane, totals[1])
      done = builder.add(start, builder.mul(builder.udiv(count, irb.i64_const(2 * LANES)),
                                            irb.i64_const(2 * LANES)))
      for half in range(2):  # up to 31 left: two masked chunks
        at = builder.add(done, irb.i64_const(half * LANES))
        left = builder.sub(end, at)
        lanes_on = builder.icmp_signed('<', lane, _splat(builder, left, LANES))
        chunk(at, lanes_on, totals[half])
      return irb.sum_of(totals)

    return types.float32(values, columns_of, start, end, r, x), codegen

  return row_dot


def _splat(builder, value, width: int):
  vector = ir.VectorType(value.type, width)
  one = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(ir.IntType(32), 0))
  return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                      [0] * width))


if numba is not None:

  @numba.njit(inline='always')
  def _scalar_row_dot(values, columns_of, start, end, r, x):  # pylint: disable=unused-argument
    """The portable compressed-row dot product: four sums hide the add's latency."""
    a = b = c = d = np.float32(0.0)
    k = start
    while k + 4 <= end:
      a += values[k] * x[columns_of[k]]
      b += values[k + 1] * x[columns_of[k + 1]]
      c += values[k + 2] * x[columns_of[k + 2]]
      d += values[k + 3] * x[columns_of[k + 3]]
      k += 4
    while k < end:
      a += values[k] * x[columns_of[k]]
      k += 1
    return (a + b) + (c + d)
