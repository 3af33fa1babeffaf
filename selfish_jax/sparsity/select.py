"""Exact top-k selection over large arrays without sorting.

Topology updates must remove and regrow an exact number of weights per
matrix. XLA's CPU sort takes seconds on the 15M-entry matrices of the paper's
large models, so selection instead searches for the k-th key with full passes
that only count (a compare-and-sum is a few milliseconds per 15M entries):
a bracketing search on the 32-bit key space that alternates interpolation and
bisection, so it needs at most 64 passes and typically a handful.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_UINT32_MAX = 0xFFFFFFFF
# Counting passes sum rows of this many int8 flags first: XLA:CPU vectorises
# that about twice as well as one int32 reduction (a row sum must fit int8).
_ROW = 120


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


def random_keys(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Distinct pseudo-random uint32 keys, one per position, derived from ``key``.

  A keyed bijective hash of the flat position: about ten times cheaper than
  drawing threefry bits on CPU, and distinct keys mean random selections never
  need tie-breaking. Ranking positions by these keys is a uniformly random
  permutation for the purposes of choosing which weights to grow.
  """
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  size = 1
  for dim in shape:
    size *= dim
  position = jax.lax.iota(jnp.uint32, size).reshape(shape)
  return _fmix32(_fmix32(position ^ seeds[0]) + seeds[1])


def _count_at_most(keys: jax.Array, threshold: jax.Array) -> jax.Array:
  """``count(keys <= threshold)`` for ``keys`` of shape ``[rows, _ROW]``."""
  flags = (keys <= threshold).astype(jnp.int8)
  return jnp.sum(jnp.sum(flags, axis=1, dtype=jnp.int8), dtype=jnp.int32)


def _kth_smallest(keys: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Bracketing search for the least ``t`` with ``count(keys <= t) >= k``.

  Returns ``(t, exact)``; ``exact`` says ``count(keys <= t) == k``, in which
  case ``t`` may be any key with that property (the search stops early).
  Requires ``1 <= k <= count(keys < 0xFFFFFFFF)``.
  """

  def cond(state):
    lo, hi, _, upto_hi, _ = state
    return (lo < hi) & (upto_hi != k)

  def body(state):
    lo, hi, below_lo, upto_hi, bisect = state
    width = hi - lo
    # Interpolate where the k-th key lies between the bracket ends (a secant
    # step on the empirical CDF); fall back to bisection after a step that did
    # not halve the bracket's count, which bounds the number of passes.
    fraction = (k - below_lo).astype(jnp.float32) / jnp.maximum(
        upto_hi - below_lo, 1).astype(jnp.float32)
    guess = lo + (fraction * width.astype(jnp.float32)).astype(jnp.uint32)
    mid = jnp.clip(jnp.where(bisect, lo + width // 2, guess), lo, hi - 1)
    count = _count_at_most(keys, mid)
    enough = count >= k
    new = (jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi),
           jnp.where(enough, below_lo, count), jnp.where(enough, count, upto_hi))
    shrunk = 2 * (new[3] - new[2]) <= upto_hi - below_lo
    return new + (~shrunk,)

  state = (jnp.uint32(0), jnp.uint32(_UINT32_MAX - 1), jnp.int32(0),
           _count_at_most(keys, jnp.uint32(_UINT32_MAX - 1)), jnp.bool_(False))
  _, hi, _, upto_hi, _ = jax.lax.while_loop(cond, body, state)
  return hi, upto_hi == k


def select_smallest(keys: jax.Array, eligible: jax.Array, k: jax.Array) -> jax.Array:
  """Boolean mask of exactly ``min(k, count(eligible))`` eligible entries with smallest keys.

  Ties at the boundary go to the lowest flat index, so the result is
  deterministic. ``k`` may be a traced integer: nothing recompiles as it
  changes. (Keys equal to 0xFFFFFFFF rank as 0xFFFFFFFE.)
  """
  shape, size = keys.shape, keys.size
  k = jnp.minimum(jnp.asarray(k, jnp.int32), jnp.sum(eligible, dtype=jnp.int32))
  # Ineligible entries (and the padding to whole rows) get the one key that no
  # eligible entry has, so each counting pass reads a single array.
  keys = jnp.where(eligible, jnp.minimum(keys, jnp.uint32(_UINT32_MAX - 1)),
                   jnp.uint32(_UINT32_MAX)).ravel()
  keys = jnp.pad(keys, (0, -size % _ROW), constant_values=jnp.uint32(_UINT32_MAX)).reshape(-1, _ROW)

  def choose(k):
    threshold, exact = _kth_smallest(keys, k)

    def break_ties(_):
      below = keys < threshold
      ties = keys == threshold
      needed = k - jnp.sum(below, dtype=jnp.int32)
      rank = jnp.cumsum(ties.ravel(), dtype=jnp.int32).reshape(ties.shape)
      return below | (ties & (rank <= needed))

    # The prefix sum is costly on large matrices and only needed when ties
    # straddle the boundary.
    return jax.lax.cond(exact, lambda _: keys <= threshold, break_ties, None)

  chosen = jax.lax.cond(k > 0, choose, lambda _: jnp.zeros(keys.shape, bool), k)
  return chosen.ravel()[:size].reshape(shape)


def select_largest(keys: jax.Array, eligible: jax.Array, k: jax.Array) -> jax.Array:
  """Like :func:`select_smallest` for the largest keys."""
  return select_smallest(~keys, eligible, k)
