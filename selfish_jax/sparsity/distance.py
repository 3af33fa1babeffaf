"""Distances between two sparse topologies (runs, or epochs of one run).

``topology_distance`` compares masks position by position. ``nnstd`` is the
Neural Network Sparse Topology Distance (Liu et al., 2020): hidden neurons of
two independently trained networks are interchangeable, so each output
neuron (column) is described by its set of active inputs, two neurons differ
by ``1 - Jaccard`` of their input sets, and the columns of one matrix are
matched to the other's by the Hungarian algorithm before averaging.
"""

from __future__ import annotations


import jax
import numpy as np

from selfish_jax.sparsity.masks import Masks, is_none

# Wider matrices (a vocabulary-sized decoder) are compared column by column
# without matching: their columns are words, not interchangeable neurons, and
# the assignment problem would be too large.
MAX_MATCHED_COLUMNS = 4096


def topology_distance(masks_a: Masks, masks_b: Masks) -> dict[str, float]:
  """Per-leaf normalised Hamming distance of two topologies.

  ``|A xor B| / (|A| + |B|)``: 0 for identical masks, 1 for disjoint ones, the
  measure used to compare the connectivity of runs and epochs.
  """
  flat_a, _ = jax.tree_util.tree_flatten_with_path(masks_a, is_leaf=is_none)
  flat_b = jax.tree.leaves(masks_b, is_leaf=is_none)
  if len(flat_a) != len(flat_b):
    raise ValueError('masks have different structures')
  result = {}
  for (path, a), b in zip(flat_a, flat_b):
    if a is None or b is None:
      continue
    a, b = np.asarray(a), np.asarray(b)
    denominator = int(a.sum()) + int(b.sum())
    result[jax.tree_util.keystr(path)] = (float(np.sum(a ^ b)) / denominator
                                          if denominator else 0.0)
  return result


def neuron_distances(mask_a: np.ndarray, mask_b: np.ndarray) -> np.ndarray:
  """``[n, n]`` Jaccard distances between the columns' input sets of two ``[in, n]`` masks
  (two empty columns are at distance 0)."""
  a, b = np.asarray(mask_a, np.float32), np.asarray(mask_b, np.float32)
  intersection = a.T @ b
  union = a.sum(0)[:, None] + b.sum(0)[None, :] - intersection
  return np.where(union > 0, 1.0 - intersection / np.maximum(union, 1.0), 0.0)


def nnstd(mask_a: np.ndarray, mask_b: np.ndarray,
          max_matched: int = MAX_MATCHED_COLUMNS) -> float:
  """NNSTD of one matrix: the mean Jaccard distance of its columns after matching
  them by the Hungarian algorithm (0: the same topology up to a permutation of
  neurons; 1: no shared connection). Columns are compared in place when there
  are more than ``max_matched``."""
  mask_a, mask_b = np.asarray(mask_a), np.asarray(mask_b)
  if mask_a.shape != mask_b.shape or mask_a.ndim != 2:
    raise ValueError(f'nnstd compares two masks of one 2-D shape, got {mask_a.shape} and '
                     f'{mask_b.shape}')
  if mask_a.shape[1] > max_matched:
    a, b = mask_a.astype(np.float32), mask_b.astype(np.float32)
    intersection = np.sum(a * b, axis=0)
    union = a.sum(0) + b.sum(0) - intersection
    return float(np.mean(np.where(union > 0, 1.0 - intersection / np.maximum(union, 1.0), 0.0)))
  from scipy import optimize  # pylint: disable=g-import-not-at-top  # only here: 0.4 s to import
  cost = neuron_distances(mask_a, mask_b)
  rows, cols = optimize.linear_sum_assignment(cost)
  return float(cost[rows, cols].mean())


def nnstd_tree(masks_a: Masks, masks_b: Masks) -> dict[str, float]:
  """:func:`nnstd` of every masked matrix of two mask trees, keyed by path."""
  flat_a, _ = jax.tree_util.tree_flatten_with_path(masks_a, is_leaf=is_none)
  flat_b = jax.tree.leaves(masks_b, is_leaf=is_none)
  if len(flat_a) != len(flat_b):
    raise ValueError('masks have different structures')
  return {jax.tree_util.keystr(path): nnstd(a, b) for (path, a), b in zip(flat_a, flat_b)
          if a is not None and b is not None and np.ndim(a) == 2}
