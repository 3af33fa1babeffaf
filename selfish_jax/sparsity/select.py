"""Exact top-k selection over large arrays without sorting.

Topology updates must remove and regrow an exact number of weights per
matrix. XLA's CPU sort takes seconds on the 15M-entry matrices of the paper's
large models, so selection instead searches for the k-th key with full passes
that only count (a compare-and-sum is a few milliseconds per 15M entries): a
bracketing search on the 32-bit key space, started from a small sorted sample
(for hashed keys, from where k/m of the range lies) and refined by secant
steps with bisection as the safeguard, until the bracket holds a few hundred
keys; the rows holding those are then gathered and sorted.
Arrays below :data:`SORT_BELOW` entries are simply argsorted (same result).
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

_UINT32_MAX = 0xFFFFFFFF
# Counting passes sum rows of at most 127 int8 flags first (a row sum must fit
# int8): XLA:CPU vectorises that about twice as well as one int32 reduction.


def sortable_keys(values: jax.Array) -> jax.Array:
  """Maps float32 values to uint32 keys with the same order (NaN-free input)."""
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def magnitude_keys(values: jax.Array) -> jax.Array:
  """uint32 keys ordered like ``|values|`` (cheaper than :func:`sortable_keys`)."""
  return jax.lax.bitcast_convert_type(jnp.abs(values.astype(jnp.float32)), jnp.uint32)


def _fmix32(x: jax.Array) -> jax.Array:
  # MurmurHash3's finaliser: a bijection on uint32 with full avalanche.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _hash(positions: jax.Array, seeds: jax.Array) -> jax.Array:
  # A keyed affine bijection (odd multiplier), then the avalanche: three
  # multiplies, where two finaliser rounds (four) made a regrowth pass 45 %
  # slower; each counting pass recomputes this for every position.
  return _fmix32(positions * (seeds[0] | jnp.uint32(1)) + seeds[1])


def random_keys(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Distinct pseudo-random uint32 keys, one per position, derived from ``key``.

  A keyed bijective hash of the flat position: about ten times cheaper than
  drawing threefry bits on CPU, and distinct keys mean random selections never
  need tie-breaking. Ranking positions by these keys is a uniformly random
  permutation for the purposes of choosing which weights to grow.
  """
  size = math.prod(shape)
  return _hash(jax.lax.iota(jnp.uint32, size), jax.random.bits(key, (2,), jnp.uint32)).reshape(shape)


_PROBES = 2  # thresholds counted per pass (packed into one uint16 row sum)
_SAMPLE = 1 << 15  # keys sampled to bracket the k-th key before the first pass
# A search stops passing over the whole array once its bracket holds at most
# this many keys: the rows holding them are gathered and sorted instead.
_FINISH_KEYS = 512


KeyFn = Callable[..., jax.Array]  # key_fn(positions, *inputs) -> uint32 keys, elementwise

# How keys spread over the uint32 range, which decides where a search guesses
# the k-th key between two counted ones: 'uniform' (linearly); 'hashed'
# (uniformly over the whole range by construction, e.g. hashes of positions:
# the k-th of m keys lies near k/m of the range, so the search needs no sample);
# 'float' (keys are the bits of non-negative floats, e.g. magnitudes, whose
# density jumps at every power of two: guesses interpolate the floats);
# 'inverted_float' (the complement of such bits, for largest-first orders).
KEY_SPACES = ('uniform', 'hashed', 'float', 'inverted_float')
_LARGEST_FLOAT_BITS = 0x7F7FFFFF
_LARGEST_UINT32_FLOAT = 4294967040.0  # the largest float32 below 2**32


def _interpolate(lo: jax.Array, hi: jax.Array, fractions: jax.Array, key_space: str) -> jax.Array:
  """Keys about ``fractions`` of the way from key ``lo`` to key ``hi``."""
  if key_space in ('uniform', 'hashed'):
    return lo + (fractions * (hi - lo).astype(jnp.float32)).astype(jnp.uint32)
  invert = (lambda key: ~key) if key_space == 'inverted_float' else (lambda key: key)
  as_float = lambda key: jax.lax.bitcast_convert_type(
      jnp.minimum(invert(key), jnp.uint32(_LARGEST_FLOAT_BITS)), jnp.float32)
  low, high = as_float(lo), as_float(hi)
  guess = jnp.maximum(low + fractions * (high - low), 0.0)
  return invert(jax.lax.bitcast_convert_type(guess, jnp.uint32))


def _row_length(size: int) -> int | None:
  """Largest divisor of ``size`` in [64, 127], or None."""
  for length in range(127, 63, -1):
    if size % length == 0:
      return length
  return None


def _row_sums(rows: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """``jnp.sum(rows, axis=1, dtype=dtype)``, summed in segments of at most 32 entries.

  XLA:CPU rewrites a reduction over more than 32 entries into a windowed
  reduction that cannot fuse with what computes its input, so the input (a
  pass's flags) would be written out and read back; segments of at most 32
  keep the whole pass one fused loop.
  """
  length = rows.shape[1]
  segment = max(d for d in range(1, 33) if length % d == 0)
  if segment == length or segment < 16:  # short rows, or too many segments to add
    return jnp.sum(rows, axis=1, dtype=dtype)
  sums = jnp.sum(rows.reshape(rows.shape[0], length // segment, segment), axis=2, dtype=dtype)
  # Added one by one: XLA would merge a second reduction back into the first.
  return functools.reduce(jnp.add, (sums[:, i] for i in range(length // segment)))


def count_true(flags: jax.Array) -> jax.Array:
  """``jnp.sum(flags)`` as int32, several times faster on XLA:CPU for large arrays."""
  flat = flags.ravel()
  length = _row_length(flat.size) or 120
  rows = jnp.pad(flat, (0, -flat.size % length)).reshape(-1, length).astype(jnp.int8)
  return jnp.sum(_row_sums(rows, jnp.int8), dtype=jnp.int32)


def _counts_at_most(rows: jax.Array, thresholds: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``count(keys <= t)`` for both ``thresholds``, in total and per row, in one pass.

  The two flags share one uint16 (low and high byte): a row of at most 127
  entries cannot carry from one byte into the other, and XLA:CPU sums uint16
  rows about three times faster per threshold than a trailing axis of flags.
  Returns ``(counts [2] int32, row_counts [2, rows] uint8)``.
  """
  packed = ((rows <= thresholds[0]).astype(jnp.uint16)
            | ((rows <= thresholds[1]).astype(jnp.uint16) << 8))
  row_sums = _row_sums(packed, jnp.uint16)
  row_counts = jnp.stack([(row_sums & 0xFF).astype(jnp.uint8), (row_sums >> 8).astype(jnp.uint8)])
  return jnp.sum(row_counts, axis=1, dtype=jnp.int32), row_counts


class _LazyKeys:
  """Keys computed on the fly from the inputs inside every pass.

  Materialising a uint32 key per weight costs XLA:CPU more than recomputing it
  in each counting pass from the inputs it is derived from (a few cheap
  elementwise ops fused into the reduction), so keys are only materialised
  when the size has no suitable row length. Keys are viewed as rows of
  ``row_length`` entries; position ``p`` is entry ``p % row_length`` of row
  ``p // row_length``.
  """

  def __init__(self, key_fn: KeyFn, inputs: tuple[jax.Array, ...]):
    self.size = inputs[0].size
    self._key_fn = key_fn
    self._inputs = tuple(x.ravel() for x in inputs)
    self._origin = jnp.uint32(0)  # added to every position; see `arrays`
    length = _row_length(self.size)
    self._lazy = length is not None
    self.row_length = length if self._lazy else 120
    self.num_rows = -(-self.size // self.row_length)
    if not self._lazy:  # pad materialised keys to whole rows
      keys = key_fn(jax.lax.iota(jnp.uint32, self.size), *self._inputs)
      self._padded = jnp.pad(keys, (0, -self.size % self.row_length),
                             constant_values=jnp.uint32(_UINT32_MAX))

  def _positions(self, row_index: jax.Array) -> jax.Array:
    return (row_index.astype(jnp.uint32)[:, None] * jnp.uint32(self.row_length)
            + (jax.lax.iota(jnp.uint32, self.row_length) + self._origin))

  def rows(self) -> jax.Array:
    """All keys, ``[num_rows, row_length]``."""
    if not self._lazy:
      return self._padded.reshape(self.num_rows, self.row_length)
    positions = self._positions(jax.lax.iota(jnp.uint32, self.num_rows))
    shape = positions.shape
    return self._key_fn(positions, *(x.reshape(shape) for x in self._inputs))

  def rows_at(self, row_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(keys, positions)`` of the rows ``row_index``, each ``[len(row_index), row_length]``."""
    positions = self._positions(row_index)
    if not self._lazy:
      return self._padded.reshape(self.num_rows, self.row_length)[row_index], positions
    gathered = (x.reshape(self.num_rows, self.row_length)[row_index] for x in self._inputs)
    return self._key_fn(positions, *gathered), positions

  @property
  def arrays(self) -> tuple[jax.Array, ...]:
    """What the passes read: the position origin (0) and the flat inputs, or
    the materialised keys. A loop that carries them through an optimization
    barrier keeps XLA from hoisting key computations out of it."""
    return (self._origin, *self._inputs) if self._lazy else (self._padded,)

  def with_arrays(self, arrays: tuple[jax.Array, ...]) -> '_LazyKeys':
    """The same keys read from ``arrays`` (values of :attr:`arrays`, e.g. a loop's carry)."""
    keys = copy.copy(self)
    if self._lazy:
      keys._origin, *inputs = arrays
      keys._inputs = tuple(inputs)
    else:
      (keys._padded,) = arrays
    return keys

  def sample(self, stride: int) -> jax.Array:
    positions = jnp.arange(0, self.size, stride, dtype=jnp.uint32)
    return self._key_fn(positions, *(x[::stride] for x in self._inputs))


class _Bracket(NamedTuple):
  """The k-th key lies in ``[lo, hi]``: ``below_lo = count(keys < lo)`` and
  ``upto_hi = count(keys <= hi)``, in total and per row (``hi_rows_known``
  says whether ``upto_hi_rows`` has been counted yet)."""
  lo: jax.Array
  hi: jax.Array
  below_lo: jax.Array
  upto_hi: jax.Array
  below_lo_rows: jax.Array
  upto_hi_rows: jax.Array
  hi_rows_known: jax.Array

  @property
  def inside(self) -> jax.Array:
    return self.upto_hi - self.below_lo


def _narrow(keys: _LazyKeys, k: jax.Array, bracket: _Bracket, thresholds: jax.Array) -> _Bracket:
  """One counting pass at ``thresholds`` (sorted), and the bracket it leaves."""
  lo, hi = bracket.lo, bracket.hi
  thresholds = jnp.clip(thresholds, lo, hi - 1)  # stays sorted
  counts, row_counts = _counts_at_most(keys.rows(), thresholds)
  enough = counts >= k
  first = jnp.argmax(enough)  # first threshold with enough keys at or below it
  found = jnp.any(enough)
  last_short = jnp.where(found, first - 1, _PROBES - 1)
  moved = last_short >= 0
  short = jnp.maximum(last_short, 0)
  return _Bracket(
      lo=jnp.where(moved, thresholds[short] + 1, lo),
      hi=jnp.where(found, thresholds[first], hi),
      below_lo=jnp.where(moved, counts[short], bracket.below_lo),
      upto_hi=jnp.where(found, counts[first], bracket.upto_hi),
      below_lo_rows=jnp.where(moved, row_counts[short], bracket.below_lo_rows),
      upto_hi_rows=jnp.where(found, row_counts[first], bracket.upto_hi_rows),
      hi_rows_known=bracket.hi_rows_known | found)


def _bracket_kth(keys: _LazyKeys, k: jax.Array, eligible_count: jax.Array,
                 key_space: str) -> _Bracket:
  """Narrows ``[lo, hi]`` around the k-th smallest key until it holds at most
  ``_FINISH_KEYS`` keys, holds only one key value, or ``count(keys <= hi) == k``.

  Ineligible entries have key 0xFFFFFFFF. Requires ``1 <= k <= eligible_count``.
  A sorted strided sample (for 'hashed' keys, the binomial spread of the
  count) brackets the k-th key first; then every pass counts
  at ``_PROBES`` thresholds placed around a secant estimate on the empirical
  CDF in ``key_space`` (spread by the expected error of the estimate), or at
  the thirds of the bracket after a pass that did not halve it. Typically 2 passes
  (hashed keys) or 3 (magnitudes).
  """
  q = k.astype(jnp.float32) / eligible_count.astype(jnp.float32)
  if key_space == 'hashed':
    # The count of keys at most a fraction x of the range is ~Binomial(m, x):
    # 4 standard deviations either side of q bracket the k-th key.
    sigma = jnp.sqrt(q * (1 - q) / eligible_count.astype(jnp.float32))
    of_range = lambda x: (jnp.clip(x, 0.0, 1.0) * _LARGEST_UINT32_FLOAT).astype(jnp.uint32)
    low, high = of_range(q - 4 * sigma), of_range(q + 4 * sigma)
  else:
    sample = jnp.sort(keys.sample(max(1, keys.size // _SAMPLE)))
    sampled = jnp.sum(sample != jnp.uint32(_UINT32_MAX), dtype=jnp.int32)
    sigma = jnp.sqrt(q * (1 - q) / jnp.maximum(sampled, 1).astype(jnp.float32))
    at = lambda x: sample[jnp.clip(x.astype(jnp.int32), 0, jnp.maximum(sampled - 1, 0))]
    low = at(jnp.floor((q - 4 * sigma) * sampled) - 2)
    high = at(jnp.ceil((q + 4 * sigma) * sampled) + 1)
  no_rows = jnp.zeros((keys.num_rows,), jnp.uint8)
  bracket = _Bracket(jnp.uint32(0), jnp.uint32(_UINT32_MAX - 1), jnp.int32(0), eligible_count,
                     no_rows, no_rows, jnp.bool_(False))
  bracket = _narrow(keys, k, bracket, jnp.stack([low, high]))

  def searching(carry):
    b, _, _ = carry
    return (b.lo < b.hi) & (b.upto_hi != k) & (b.inside > _FINISH_KEYS)

  def narrow(carry):
    b, bisect, arrays = carry
    # The barrier hides that the inputs never change, so XLA recomputes the
    # keys inside each pass instead of hoisting them out of the loop into a
    # materialised uint32 array (more bytes to read than the inputs).
    arrays = jax.lax.optimization_barrier(arrays)
    loop_keys = keys.with_arrays(arrays)
    inside = b.inside.astype(jnp.float32)
    fraction = (k - b.below_lo).astype(jnp.float32) / inside
    # Expected error of the estimate: ~sqrt(n) of the n keys in the bracket,
    # plus, for floats, the curvature of their CDF across the bracket (about
    # an eighth of the bracket's share of all keys for smooth densities).
    spread = 2.0 / jnp.sqrt(inside)
    if key_space in ('float', 'inverted_float'):
      spread += 0.25 * inside / eligible_count.astype(jnp.float32)
    secant = jnp.clip(fraction + jnp.array([-1.0, 1.0], jnp.float32) * spread, 0.0, 1.0)
    thirds = _interpolate(b.lo, b.hi, jnp.array([1 / 3, 2 / 3], jnp.float32), 'uniform')
    guesses = jnp.where(bisect, thirds, _interpolate(b.lo, b.hi, secant, key_space))
    new = _narrow(loop_keys, k, b, jnp.sort(guesses))
    return new, 2 * new.inside > b.inside, arrays

  bracket, _, _ = jax.lax.while_loop(searching, narrow,
                                     (bracket, jnp.bool_(False), keys.arrays))
  return bracket


def _kth_in_bracket(keys: _LazyKeys, k: jax.Array, bracket: _Bracket, tie_order: TieOrder
                    ) -> tuple[jax.Array, jax.Array]:
  """``(key, tie)`` of the k-th smallest pair when the bracket holds at most
  ``_FINISH_KEYS`` keys: only the rows holding them are gathered and sorted."""
  upto_hi_rows = jax.lax.cond(
      bracket.hi_rows_known, lambda: bracket.upto_hi_rows,
      lambda: _counts_at_most(keys.rows(), jnp.stack([bracket.hi, bracket.hi]))[1][0])
  holding = upto_hi_rows > bracket.below_lo_rows
  (row_index,) = jnp.nonzero(holding, size=_FINISH_KEYS, fill_value=0)
  real_row = jnp.arange(_FINISH_KEYS) < count_true(holding)
  row_keys, row_positions = keys.rows_at(row_index)
  inside = real_row[:, None] & (row_keys >= bracket.lo) & (row_keys <= bracket.hi)
  # At most _FINISH_KEYS of the gathered entries are inside: sort only those.
  (entry,) = jnp.nonzero(inside.ravel(), size=_FINISH_KEYS, fill_value=0)
  real_entry = jnp.arange(_FINISH_KEYS) < bracket.inside
  never = jnp.uint32(_UINT32_MAX)
  sorted_keys, sorted_ties = jax.lax.sort(
      (jnp.where(real_entry, row_keys.ravel()[entry], never),
       jnp.where(real_entry, tie_order(row_positions.ravel()[entry]), never)), num_keys=2)
  rank = k - bracket.below_lo - 1
  return sorted_keys[rank], sorted_ties[rank]


def _kth_smallest(keys: _LazyKeys, key_fn: KeyFn, inputs: tuple[jax.Array, ...], k: jax.Array,
                  eligible_count: jax.Array, key_space: str, tie_order: TieOrder,
                  distinct: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(key, tie)`` such that exactly ``k`` entries have ``(key, tie_order(position))``
  at most it in lexicographic order (see :class:`Cut`).

  ``distinct`` promises that eligible keys never tie (a search over tie orders).
  """
  bracket = _bracket_kth(keys, k, eligible_count, key_space)
  never = jnp.uint32(_UINT32_MAX)
  if distinct:
    tied = lambda: (bracket.hi, never)  # lo == hi with distinct keys: a single key
  else:
    def tied():
      # More than _FINISH_KEYS entries share the key: find the tie order of the
      # last tie to take by the same search over the ties' (distinct) orders.
      lo = bracket.lo
      tie_fn = lambda pos, *xs: jnp.where(key_fn(pos, *xs) == lo, tie_order(pos), never)
      ties = _LazyKeys(tie_fn, inputs)
      tie, _ = _kth_smallest(ties, tie_fn, inputs, k - bracket.below_lo, bracket.inside,
                             tie_order.key_space, tie_order, distinct=True)
      return lo, tie

  return jax.lax.cond(
      bracket.upto_hi == k, lambda: (bracket.hi, never),
      lambda: jax.lax.cond(bracket.inside <= _FINISH_KEYS,
                           lambda: _kth_in_bracket(keys, k, bracket, tie_order), tied))


class Cut(NamedTuple):
  """A selection as a threshold: entries whose ``(key, tie)`` is at most
  ``(key, tie)`` in lexicographic order are chosen (none if not ``any``).

  ``tie`` is an entry's place in the :class:`TieOrder` among equal keys.
  Evaluating :meth:`chosen` is elementwise, so XLA fuses it into whatever uses
  the selection instead of materialising a mask.
  """
  key: jax.Array
  tie: jax.Array
  any: jax.Array

  def chosen(self, keys: jax.Array, ties: jax.Array) -> jax.Array:
    return self.any & ((keys < self.key) | ((keys == self.key) & (ties <= self.tie)))


class TieOrder:
  """Which of equal keys a selection takes first: a distinct uint32 per flat
  position, smallest first. :func:`lowest_positions` (the flat positions
  themselves) or :func:`random_ties` (a random permutation drawn from a key)."""

  def __init__(self, fn: Callable[[jax.Array], jax.Array], key_space: str):
    self._fn, self.key_space = fn, key_space

  def __call__(self, positions: jax.Array) -> jax.Array:
    return self._fn(positions)


def lowest_positions() -> TieOrder:
  """Ties go to the lowest flat positions (deterministic; biased towards the first rows)."""
  return TieOrder(lambda positions: positions, 'uniform')


def random_ties(key: jax.Array) -> TieOrder:
  """Ties go in a uniformly random order drawn from ``key`` (a keyed bijective
  hash of the position, like :func:`random_keys`)."""
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  return TieOrder(lambda positions: _hash(positions, seeds), 'hashed')


def positions(shape: tuple[int, ...]) -> jax.Array:
  """Flat uint32 position of every entry of an array of ``shape``."""
  return jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)


def smallest_cut(key_fn: KeyFn, inputs: tuple[jax.Array, ...], k: jax.Array,
                 eligible_count: jax.Array | None = None, key_space: str = 'uniform',
                 tie_order: TieOrder | None = None) -> Cut:
  """The :class:`Cut` choosing exactly ``min(k, eligible)`` entries with the smallest keys.

  ``key_fn(positions, *inputs)`` maps flat uint32 positions and the inputs'
  matching entries to uint32 keys, 0xFFFFFFFF marking ineligible entries
  (eligible keys must be below it). It is applied elementwise inside every
  counting pass, so it must be cheap. ``k`` may be traced: nothing recompiles
  as it changes. ``eligible_count``, if known, saves one pass. ``key_space``
  (one of :data:`KEY_SPACES`) only steers the search's guesses, never the result.
  ``tie_order`` decides among equal keys (default: :func:`lowest_positions`).
  """
  tie_order = tie_order or lowest_positions()
  if key_space not in KEY_SPACES:
    raise ValueError(f'unknown key space {key_space!r}; expected one of {KEY_SPACES}')
  keys = _LazyKeys(key_fn, inputs)
  if eligible_count is None:
    eligible_count = count_true(keys.rows() != jnp.uint32(_UINT32_MAX))
  eligible_count = jnp.asarray(eligible_count, jnp.int32)
  k = jnp.minimum(jnp.asarray(k, jnp.int32), eligible_count)
  threshold, position = jax.lax.cond(
      k > 0, lambda: _kth_smallest(keys, key_fn, inputs, k, eligible_count, key_space,
                                   tie_order),
      lambda: (jnp.uint32(0), jnp.uint32(0)))
  return Cut(threshold, position, k > 0)


# Below this many entries a stable argsort is the selection: it compiles in a
# fraction of the counting search's time and, at that size, runs as fast;
# above it the search wins by a growing factor (RESULTS.md, Speed).
SORT_BELOW = 1 << 14


def smallest_by(key_fn: KeyFn, inputs: tuple[jax.Array, ...], k: jax.Array,
                eligible_count: jax.Array | None = None, key_space: str = 'uniform',
                sort_below: int = SORT_BELOW, tie_order: TieOrder | None = None) -> jax.Array:
  """Boolean mask of the entries :func:`smallest_cut` chooses.

  Arrays of fewer than ``sort_below`` entries are ranked by sorting their
  ``(key, tie)`` pairs instead (the same choice).
  """
  tie_order = tie_order or lowest_positions()
  shape = inputs[0].shape
  where = positions(shape)
  if math.prod(shape) < sort_below:
    keys = key_fn(where, *inputs).ravel()
    count = jnp.minimum(jnp.asarray(k, jnp.int32), count_true(keys != jnp.uint32(_UINT32_MAX)))
    ranked_first = jnp.arange(keys.size) < count
    *_, order = jax.lax.sort((keys, tie_order(where.ravel()), jnp.arange(keys.size)), num_keys=2)
    chosen = jnp.zeros(keys.shape, bool).at[order].set(ranked_first)
    return chosen.reshape(shape)
  cut = smallest_cut(key_fn, inputs, k, eligible_count, key_space, tie_order)
  return cut.chosen(key_fn(where, *inputs), tie_order(where))


# The public selections below are jitted: inside a training program each is
# traced once per leaf shape, and later programs over the same shapes reuse
# those traces (and, called on their own, the compiled programs).


def _eligible_key(eligible, key):
  return jnp.where(eligible, jnp.minimum(key, jnp.uint32(_UINT32_MAX - 1)),
                   jnp.uint32(_UINT32_MAX))


@functools.partial(jax.jit, static_argnames='sort_below')
def select_smallest(keys: jax.Array, eligible: jax.Array, k: jax.Array,
                    sort_below: int = SORT_BELOW) -> jax.Array:
  """Boolean mask of exactly ``min(k, count(eligible))`` eligible entries with smallest keys.

  Ties at the boundary go to the lowest flat index, so the result is
  deterministic. (Keys equal to 0xFFFFFFFF rank as 0xFFFFFFFE.)
  """
  return smallest_by(lambda _, key, e: _eligible_key(e, key), (keys, eligible), k,
                     sort_below=sort_below)


def select_largest(keys: jax.Array, eligible: jax.Array, k: jax.Array,
                   sort_below: int = SORT_BELOW) -> jax.Array:
  """Like :func:`select_smallest` for the largest keys."""
  return select_smallest(~keys, eligible, k, sort_below)


def smallest_magnitude_keys(_, values: jax.Array, eligible: jax.Array) -> jax.Array:
  """Key function (see :func:`smallest_cut`): smallest ``|values|`` first."""
  return _eligible_key(eligible, magnitude_keys(values))


def largest_magnitude_keys(_, values: jax.Array, eligible: jax.Array) -> jax.Array:
  """Key function: largest ``|values|`` first."""
  return _eligible_key(eligible, ~magnitude_keys(values))


def among_false(key_fn: KeyFn) -> KeyFn:
  """``key_fn`` with its last input, the eligibility flags, inverted: it ranks
  the entries whose flag is False. Inverting inside every pass costs nothing,
  where passing ``~flags`` would write the complement out first."""
  return lambda positions, *inputs: key_fn(positions, *inputs[:-1], ~inputs[-1])


def random_order_keys(key: jax.Array) -> KeyFn:
  """Key function ``(positions, eligible)``: a random order of positions drawn from ``key``.

  The order of :func:`random_keys` (largest first), recomputed in every pass
  and never stored.
  """
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  return lambda pos, eligible: _eligible_key(eligible, ~_hash(pos, seeds))


@functools.partial(jax.jit, static_argnames='sort_below')
def smallest_magnitudes(values: jax.Array, eligible: jax.Array, k: jax.Array,
                        eligible_count: jax.Array | None = None,
                        sort_below: int = SORT_BELOW) -> jax.Array:
  """The ``k`` eligible entries with the smallest ``|values|`` (keys never materialised)."""
  return smallest_by(smallest_magnitude_keys, (values, eligible), k, eligible_count, 'float',
                     sort_below)


@functools.partial(jax.jit, static_argnames=('sort_below', 'complement'))
def largest_magnitudes(values: jax.Array, eligible: jax.Array, k: jax.Array,
                       eligible_count: jax.Array | None = None,
                       sort_below: int = SORT_BELOW, *, complement: bool = False,
                       tie_key: jax.Array | None = None) -> jax.Array:
  """The ``k`` eligible entries with the largest ``|values|``; with ``complement``
  the eligible entries are those whose ``eligible`` is False (see :func:`among_false`).

  Equal magnitudes (a gradient that is zero in most rows) go in a random order
  drawn from ``tie_key``, or to the lowest positions without one.
  """
  key_fn = among_false(largest_magnitude_keys) if complement else largest_magnitude_keys
  ties = lowest_positions() if tie_key is None else random_ties(tie_key)
  return smallest_by(key_fn, (values, eligible), k, eligible_count, 'inverted_float', sort_below,
                     ties)


@functools.partial(jax.jit, static_argnames=('sort_below', 'complement'))
def random_subset(key: jax.Array, eligible: jax.Array, k: jax.Array,
                  eligible_count: jax.Array | None = None,
                  sort_below: int = SORT_BELOW, *, complement: bool = False) -> jax.Array:
  """``k`` eligible positions drawn uniformly without replacement; with
  ``complement`` the eligible positions are those whose ``eligible`` is False.

  The same choice as ``select_largest(random_keys(key, shape), eligible, k)``.
  """
  key_fn = random_order_keys(key)
  return smallest_by(among_false(key_fn) if complement else key_fn, (eligible,), k,
                     eligible_count, 'hashed', sort_below=sort_below)
