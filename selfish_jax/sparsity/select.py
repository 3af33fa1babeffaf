"""Exact top-k selection over large arrays without sorting.

Topology updates must remove and regrow an exact number of weights per
matrix. XLA's CPU sort takes seconds on the 15M-entry matrices of the paper's
large models, so selection instead searches for the k-th key with full passes
that only count (a compare-and-sum is a few milliseconds per 15M entries): a
bracketing search on the 32-bit key space, started from a small sorted sample
and refined by secant steps with bisection as the safeguard.
"""

from __future__ import annotations

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
  return _fmix32(_fmix32(positions ^ seeds[0]) + seeds[1])


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


KeyFn = Callable[..., jax.Array]  # key_fn(positions, *inputs) -> uint32 keys, elementwise


def _row_length(size: int) -> int | None:
  """Largest divisor of ``size`` in [64, 127], or None."""
  for length in range(127, 63, -1):
    if size % length == 0:
      return length
  return None


def count_true(flags: jax.Array) -> jax.Array:
  """``jnp.sum(flags)`` as int32, several times faster on XLA:CPU for large arrays."""
  flat = flags.ravel()
  length = _row_length(flat.size) or 120
  rows = jnp.pad(flat, (0, -flat.size % length)).reshape(-1, length).astype(jnp.int8)
  return jnp.sum(jnp.sum(rows, axis=1, dtype=jnp.int8), dtype=jnp.int32)


def _counts_at_most(rows: jax.Array, thresholds: jax.Array) -> jax.Array:
  """``count(keys <= t)`` for both ``thresholds``, in one pass.

  The two flags share one uint16 (low and high byte): a row of at most 127
  entries cannot carry from one byte into the other, and XLA:CPU sums uint16
  rows about three times faster per threshold than a trailing axis of flags.
  """
  packed = ((rows <= thresholds[0]).astype(jnp.uint16)
            | ((rows <= thresholds[1]).astype(jnp.uint16) << 8))
  row_sums = jnp.sum(packed, axis=1, dtype=jnp.uint16)
  return jnp.stack([jnp.sum(row_sums & 0xFF, dtype=jnp.int32),
                    jnp.sum(row_sums >> 8, dtype=jnp.int32)])


class _LazyKeys:
  """Keys computed on the fly from the inputs inside every pass.

  Materialising a uint32 key per weight costs XLA:CPU more than recomputing it
  in each counting pass from the inputs it is derived from (a few cheap
  elementwise ops fused into the reduction), so keys are only materialised
  when the size has no suitable row length.
  """

  def __init__(self, key_fn: KeyFn, inputs: tuple[jax.Array, ...]):
    self.shape = inputs[0].shape
    self.size = inputs[0].size
    self._key_fn = key_fn
    self._inputs = tuple(x.ravel() for x in inputs)
    self._length = _row_length(self.size)
    if self._length is None:  # pad materialised keys to whole rows of 120
      keys = key_fn(jax.lax.iota(jnp.uint32, self.size), *self._inputs)
      self._padded = jnp.pad(keys, (0, -self.size % 120), constant_values=jnp.uint32(_UINT32_MAX))

  def rows(self) -> jax.Array:
    if self._length is None:
      return self._padded.reshape(-1, 120)
    shape = (self.size // self._length, self._length)
    positions = (jax.lax.broadcasted_iota(jnp.uint32, shape, 0) * jnp.uint32(self._length)
                 + jax.lax.broadcasted_iota(jnp.uint32, shape, 1))
    return self._key_fn(positions, *(x.reshape(shape) for x in self._inputs))

  def sample(self, stride: int) -> jax.Array:
    positions = jnp.arange(0, self.size, stride, dtype=jnp.uint32)
    return self._key_fn(positions, *(x[::stride] for x in self._inputs))

  def to_shape(self, rows: jax.Array) -> jax.Array:
    return rows.ravel()[:self.size].reshape(self.shape)


def _kth_smallest(keys: _LazyKeys, k: jax.Array, eligible_count: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Bracketing search for the least ``t`` with ``count(keys <= t) >= k``.

  Ineligible entries have key 0xFFFFFFFF. Returns ``(t, exact)``; ``exact``
  says ``count(keys <= t) == k``, in which case ``t`` may be any key with that
  property (the search stops early). Requires ``1 <= k <= eligible_count``.

  A sorted strided sample brackets the k-th key first; then every pass counts
  at ``_PROBES`` thresholds placed around a secant estimate on the empirical
  CDF (spread by the expected error of the estimate), or at the thirds of the
  bracket after a pass that did not halve it. Typically 5-10 passes.
  """

  def update(state, thresholds):
    lo, hi, below_lo, upto_hi = state
    thresholds = jnp.clip(thresholds, lo, hi - 1)  # stays sorted
    counts = _counts_at_most(keys.rows(), thresholds)
    enough = counts >= k
    first = jnp.argmax(enough)  # first threshold with enough keys at or below it
    found = jnp.any(enough)
    hi, upto_hi = (jnp.where(found, thresholds[first], hi),
                   jnp.where(found, counts[first], upto_hi))
    last_short = jnp.where(found, first - 1, _PROBES - 1)
    moved = last_short >= 0
    lo = jnp.where(moved, thresholds[last_short] + 1, lo)
    below_lo = jnp.where(moved, counts[last_short], below_lo)
    return lo, hi, below_lo, upto_hi

  # Bracket from a sample: its quantiles around k / eligible_count, +-4 sigma.
  sample = jnp.sort(keys.sample(max(1, keys.size // _SAMPLE)))
  sampled = jnp.sum(sample != jnp.uint32(_UINT32_MAX), dtype=jnp.int32)
  q = k.astype(jnp.float32) / eligible_count.astype(jnp.float32)
  sigma = jnp.sqrt(q * (1 - q) / jnp.maximum(sampled, 1).astype(jnp.float32))
  at = lambda x: sample[jnp.clip(x.astype(jnp.int32), 0, jnp.maximum(sampled - 1, 0))]
  low = at(jnp.floor((q - 4 * sigma) * sampled) - 2)
  high = at(jnp.ceil((q + 4 * sigma) * sampled) + 1)
  state = (jnp.uint32(0), jnp.uint32(_UINT32_MAX - 1), jnp.int32(0), eligible_count)
  state = update(state, jnp.stack([low, high]))

  def cond(carry):
    (lo, hi, _, upto_hi), _ = carry
    return (lo < hi) & (upto_hi != k)

  def body(carry):
    (lo, hi, below_lo, upto_hi), bisect = carry
    in_bracket = upto_hi - below_lo
    width = (hi - lo).astype(jnp.float32)
    fraction = (k - below_lo).astype(jnp.float32) / jnp.maximum(in_bracket, 1).astype(jnp.float32)
    # Expected error of the estimate: ~sqrt(n) keys while many are in the
    # bracket, then one key gap.
    spread = jnp.where(in_bracket > 64, 2.0 / jnp.sqrt(in_bracket.astype(jnp.float32)),
                       1.0 / jnp.maximum(in_bracket, 1).astype(jnp.float32))
    offsets = jnp.array([-1.0, 1.0], jnp.float32) * spread
    secant = jnp.clip(fraction + offsets, 0.0, 1.0)
    thirds = jnp.array([1 / 3, 2 / 3], jnp.float32)
    where = jnp.where(bisect, thirds, secant)
    thresholds = lo + (where * width).astype(jnp.uint32)
    new = update((lo, hi, below_lo, upto_hi), thresholds)
    return new, 2 * (new[3] - new[2]) > in_bracket

  (_, hi, _, upto_hi), _ = jax.lax.while_loop(cond, body, (state, jnp.bool_(False)))
  return hi, upto_hi == k


class Cut(NamedTuple):
  """A selection as a threshold: entries whose ``(key, position)`` is at most
  ``(key, position)`` in lexicographic order are chosen (none if not ``any``).

  Ties on the key go to the lowest flat positions. Evaluating :meth:`chosen`
  is elementwise, so XLA fuses it into whatever uses the selection instead of
  materialising a mask.
  """
  key: jax.Array
  position: jax.Array
  any: jax.Array

  def chosen(self, keys: jax.Array, positions: jax.Array) -> jax.Array:
    return self.any & ((keys < self.key) | ((keys == self.key) & (positions <= self.position)))


def positions(shape: tuple[int, ...]) -> jax.Array:
  """Flat uint32 position of every entry of an array of ``shape``."""
  return jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)


def smallest_cut(key_fn: KeyFn, inputs: tuple[jax.Array, ...], k: jax.Array,
                 eligible_count: jax.Array | None = None) -> Cut:
  """The :class:`Cut` choosing exactly ``min(k, eligible)`` entries with the smallest keys.

  ``key_fn(positions, *inputs)`` maps flat uint32 positions and the inputs'
  matching entries to uint32 keys, 0xFFFFFFFF marking ineligible entries
  (eligible keys must be below it). It is applied elementwise inside every
  counting pass, so it must be cheap. ``k`` may be traced: nothing recompiles
  as it changes. ``eligible_count``, if known, saves one pass.
  """
  keys = _LazyKeys(key_fn, inputs)
  if eligible_count is None:
    eligible_count = count_true(keys.rows() != jnp.uint32(_UINT32_MAX))
  eligible_count = jnp.asarray(eligible_count, jnp.int32)
  k = jnp.minimum(jnp.asarray(k, jnp.int32), eligible_count)

  def find(k):
    threshold, exact = _kth_smallest(keys, k, eligible_count)

    def tie_position(_):
      # Only when ties straddle the boundary: the position of the last tie to
      # take, found by the same search over the ties' (distinct) positions.
      ties = _LazyKeys(lambda pos, *xs: jnp.where(key_fn(pos, *xs) == threshold, pos,
                                                  jnp.uint32(_UINT32_MAX)), inputs)
      needed = k - count_true(keys.rows() < threshold)
      tie_count = count_true(ties.rows() != jnp.uint32(_UINT32_MAX))
      return _kth_smallest(ties, needed, tie_count)[0]

    position = jax.lax.cond(exact, lambda _: jnp.uint32(_UINT32_MAX), tie_position, None)
    return threshold, position

  threshold, position = jax.lax.cond(k > 0, find,
                                     lambda _: (jnp.uint32(0), jnp.uint32(0)), k)
  return Cut(threshold, position, k > 0)


def smallest_by(key_fn: KeyFn, inputs: tuple[jax.Array, ...], k: jax.Array,
                eligible_count: jax.Array | None = None) -> jax.Array:
  """Boolean mask of the entries :func:`smallest_cut` chooses."""
  cut = smallest_cut(key_fn, inputs, k, eligible_count)
  where = positions(inputs[0].shape)
  return cut.chosen(key_fn(where, *inputs), where)


def _eligible_key(eligible, key):
  return jnp.where(eligible, jnp.minimum(key, jnp.uint32(_UINT32_MAX - 1)),
                   jnp.uint32(_UINT32_MAX))


def select_smallest(keys: jax.Array, eligible: jax.Array, k: jax.Array) -> jax.Array:
  """Boolean mask of exactly ``min(k, count(eligible))`` eligible entries with smallest keys.

  Ties at the boundary go to the lowest flat index, so the result is
  deterministic. (Keys equal to 0xFFFFFFFF rank as 0xFFFFFFFE.)
  """
  return smallest_by(lambda _, key, e: _eligible_key(e, key), (keys, eligible), k)


def select_largest(keys: jax.Array, eligible: jax.Array, k: jax.Array) -> jax.Array:
  """Like :func:`select_smallest` for the largest keys."""
  return select_smallest(~keys, eligible, k)


def smallest_magnitude_keys(_, values: jax.Array, eligible: jax.Array) -> jax.Array:
  """Key function (see :func:`smallest_cut`): smallest ``|values|`` first."""
  return _eligible_key(eligible, magnitude_keys(values))


def largest_magnitude_keys(_, values: jax.Array, eligible: jax.Array) -> jax.Array:
  """Key function: largest ``|values|`` first."""
  return _eligible_key(eligible, ~magnitude_keys(values))


def random_order_keys(key: jax.Array) -> KeyFn:
  """Key function ``(positions, eligible)``: a random order of positions drawn from ``key``.

  The order of :func:`random_keys` (largest first), recomputed in every pass
  and never stored.
  """
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  return lambda pos, eligible: _eligible_key(eligible, ~_hash(pos, seeds))


def smallest_magnitudes(values: jax.Array, eligible: jax.Array, k: jax.Array,
                        eligible_count: jax.Array | None = None) -> jax.Array:
  """The ``k`` eligible entries with the smallest ``|values|`` (keys never materialised)."""
  return smallest_by(smallest_magnitude_keys, (values, eligible), k, eligible_count)


def largest_magnitudes(values: jax.Array, eligible: jax.Array, k: jax.Array,
                       eligible_count: jax.Array | None = None) -> jax.Array:
  """The ``k`` eligible entries with the largest ``|values|``."""
  return smallest_by(largest_magnitude_keys, (values, eligible), k, eligible_count)


def random_subset(key: jax.Array, eligible: jax.Array, k: jax.Array,
                  eligible_count: jax.Array | None = None) -> jax.Array:
  """``k`` eligible positions drawn uniformly without replacement.

  The same choice as ``select_largest(random_keys(key, shape), eligible, k)``.
  """
  return smallest_by(random_order_keys(key), (eligible,), k, eligible_count)
