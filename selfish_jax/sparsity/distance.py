"""Distances between sparse topologies (runs, seeds, or epochs of one run).

``topology_distance`` compares masks position by position;
``pairwise_topology_distance`` does so for every pair of a stack of masks
(a leading seed axis, as ``jax.vmap`` over seeds leaves them), on the device.
``nnstd`` is the Neural Network Sparse Topology Distance (Liu et al., 2020):
hidden neurons of two independently trained networks are interchangeable, so
each output neuron (column) is described by its set of active inputs, two
neurons differ by ``1 - Jaccard`` of their input sets, and the columns of one
matrix are matched to the other's by the Hungarian algorithm before
averaging. The Jaccard cost matrices are ``jnp`` (:func:`neuron_distances`
runs under ``jit`` and ``vmap``); only the matching runs on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from selfish_jax.sparsity.masks import Masks, check_masks, is_none

# Wider matrices (a vocabulary-sized decoder) are compared column by column
# without matching: their columns are words, not interchangeable neurons, and
# the assignment problem would be too large.
MAX_MATCHED_COLUMNS = 4096


def _paired_leaves(masks_a: Masks, masks_b: Masks) -> list[tuple[str, jax.Array, jax.Array]]:
  check_masks(masks_a)
  check_masks(masks_b)
  flat_a, _ = jax.tree_util.tree_flatten_with_path(masks_a, is_leaf=is_none)
  flat_b = jax.tree.leaves(masks_b, is_leaf=is_none)
  if len(flat_a) != len(flat_b):
    raise ValueError('masks have different structures')
  return [(jax.tree_util.keystr(path), a, b) for (path, a), b in zip(flat_a, flat_b)
          if a is not None and b is not None]


def topology_distance_counts(masks_a: Masks, masks_b: Masks
                             ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Per leaf ``(|A xor B|, |A| + |B|)`` (int32): :func:`topology_distance`'s
  terms, for a ratio taken on the host in float64 (a run's records)."""
  return {name: (jnp.sum(a ^ b, dtype=jnp.int32),
                 jnp.sum(a, dtype=jnp.int32) + jnp.sum(b, dtype=jnp.int32))
          for name, a, b in _paired_leaves(masks_a, masks_b)}


def topology_distance(masks_a: Masks, masks_b: Masks) -> dict[str, jax.Array]:
  """Per-leaf normalised Hamming distance of two topologies.

  ``|A xor B| / (|A| + |B|)``: 0 for identical masks, 1 for disjoint ones (0
  when both are empty), the measure used to compare the connectivity of runs
  and epochs.
  """
  return {name: jnp.where(total > 0, differ / jnp.maximum(total, 1), 0.0).astype(jnp.float32)
          for name, (differ, total) in topology_distance_counts(masks_a, masks_b).items()}


def pairwise_topology_distance(masks: Masks) -> dict[str, jax.Array]:
  """``[S, S]`` :func:`topology_distance` between every pair of a stack of
  masks (each mask leaf ``[S, ...]``: S seeds or epochs), per leaf, on the device.

  One pass per row: the shared weights of row ``i`` with every row at once.
  """
  check_masks(masks)
  result = {}
  for path, stack in jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)[0]:
    if stack is None:
      continue
    flat = stack.reshape(stack.shape[0], -1)
    sizes = jnp.sum(flat, axis=1, dtype=jnp.int32)
    shared = jax.lax.map(lambda row: jnp.sum(row & flat, axis=1, dtype=jnp.int32), flat)
    total = sizes[:, None] + sizes[None, :]
    result[jax.tree_util.keystr(path)] = jnp.where(
        total > 0, (total - 2 * shared) / jnp.maximum(total, 1), 0.0).astype(jnp.float32)
  return result


def _jaccard_distance(intersection: jax.Array, union: jax.Array) -> jax.Array:
  """``1 - |A and B| / |A or B|`` (0 for two empty sets)."""
  return jnp.where(union > 0, 1.0 - intersection / jnp.maximum(union, 1.0), 0.0)


def neuron_distances(mask_a: jax.Array, mask_b: jax.Array) -> jax.Array:
  """``[n, n]`` Jaccard distances between the columns' input sets of two ``[in, n]`` masks
  (two empty columns are at distance 0): NNSTD's cost matrix, on the device."""
  a, b = jnp.asarray(mask_a, jnp.float32), jnp.asarray(mask_b, jnp.float32)
  intersection = a.T @ b  # exact: counts of at most `in` < 2**24
  union = a.sum(0)[:, None] + b.sum(0)[None, :] - intersection
  return _jaccard_distance(intersection, union)


def column_distances(mask_a: jax.Array, mask_b: jax.Array) -> jax.Array:
  """Mean Jaccard distance of each column with the same column of the other mask
  (no matching: what NNSTD uses for matrices wider than ``MAX_MATCHED_COLUMNS``)."""
  a, b = jnp.asarray(mask_a, jnp.float32), jnp.asarray(mask_b, jnp.float32)
  intersection = jnp.sum(a * b, axis=0)
  union = a.sum(0) + b.sum(0) - intersection
  return jnp.mean(_jaccard_distance(intersection, union))


def nnstd(mask_a: jax.Array, mask_b: jax.Array, max_matched: int = MAX_MATCHED_COLUMNS) -> float:
  """NNSTD of one matrix: the mean Jaccard distance of its columns after matching
  them by the Hungarian algorithm (0: the same topology up to a permutation of
  neurons; 1: no shared connection). Columns are compared in place when there
  are more than ``max_matched``. The costs are computed on the device, the
  matching on the host (it cannot run under ``jit``)."""
  if mask_a.shape != mask_b.shape or len(mask_a.shape) != 2:
    raise ValueError(f'nnstd compares two masks of one 2-D shape, got {mask_a.shape} and '
                     f'{mask_b.shape}')
  if mask_a.shape[1] > max_matched:
    return float(column_distances(mask_a, mask_b))
  from scipy import optimize  # pylint: disable=g-import-not-at-top  # slow to import: here only
  cost = np.asarray(jax.jit(neuron_distances)(mask_a, mask_b))
  rows, cols = optimize.linear_sum_assignment(cost)
  return float(cost[rows, cols].mean())


def nnstd_tree(masks_a: Masks, masks_b: Masks) -> dict[str, float]:
  """:func:`nnstd` of every masked matrix of two mask trees, keyed by path."""
  return {name: nnstd(a, b) for name, a, b in _paired_leaves(masks_a, masks_b)
          if len(a.shape) == 2}
