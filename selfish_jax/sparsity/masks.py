"""Masks: a pytree beside the parameters.

``masks`` mirrors ``params``: a boolean array for every masked leaf (embedding,
LSTM kernels, decoder) and ``None`` for dense leaves (biases). Parameters are
kept masked, i.e. zero wherever their mask is False, so models use them as they
are and no per-step mask product is needed in the forward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from selfish_jax.errors import ConfigError
from selfish_jax.sparsity import select

PyTree = Any
Masks = PyTree
LeafPredicate = Callable[[tuple, jax.Array], bool]

SPARSE_INITS = ('uniform', 'er')


def is_none(x: Any) -> bool:
  return x is None


def key_names(path: tuple) -> tuple[str, ...]:
  """A ``jax.tree_util`` key path of dict keys as plain strings: ``('lstm_0', 'input_kernel')``."""
  return tuple(str(getattr(entry, 'key', entry)) for entry in path)


def default_is_sparse(path: tuple, leaf: jax.Array) -> bool:
  """Weight matrices and embeddings are sparse; vectors (biases) stay dense."""
  del path
  return leaf.ndim >= 2


def map_with_masks(fn: Callable[..., Any], tree: PyTree, masks: Masks | None,
                   *rest: PyTree) -> PyTree:
  """``fn(leaf, mask_or_None, *rest_leaves)`` over ``tree``; ``masks=None`` means all dense."""
  if masks is None:
    return jax.tree.map(lambda x, *r: fn(x, None, *r), tree, *rest)
  return jax.tree.map(lambda m, x, *r: fn(x, m, *r), masks, tree, *rest, is_leaf=is_none)


def map_masked(fn: Callable[..., Any], params: PyTree, masks: Masks, *rest: PyTree) -> PyTree:
  """``fn(param, mask, *rest)`` on masked leaves; the param unchanged on dense leaves."""
  return map_with_masks(lambda p, m, *r: p if m is None else fn(p, m, *r), params, masks, *rest)


def flatten_with_masks(masks: Masks, *trees: PyTree | None) -> tuple[list, Any, list[list]]:
  """``(mask leaves, treedef, [leaves of each tree])`` aligned on the masks' structure.

  A tree given as None flattens to a list of None, one per mask leaf.
  """
  flat_masks, treedef = jax.tree_util.tree_flatten(masks, is_leaf=is_none)
  return flat_masks, treedef, [treedef.flatten_up_to(t) if t is not None
                               else [None] * len(flat_masks) for t in trees]


def apply_masks(params: PyTree, masks: Masks) -> PyTree:
  """Zeroes every masked-out weight."""
  return map_masked(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def dense_masks(params: PyTree) -> Masks:
  """Masks with no masked leaf (the dense model)."""
  return jax.tree.map(lambda _: None, params)


def _sparse_leaves(params: PyTree, is_sparse: LeafPredicate) -> dict[tuple, jax.Array]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {path: leaf for path, leaf in flat if is_sparse(path, leaf)}


def validate_density(density: float) -> None:
  if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
    raise ConfigError(f'density must be in (0, 1], got {density!r}')


def leaf_densities(params: PyTree, density: float, sparse_init: str = 'uniform',
                   is_sparse: LeafPredicate = default_is_sparse) -> dict[tuple, float]:
  """Per-matrix densities (keyed by tree path) whose weighted mean is ``density``.

  ``uniform`` gives every matrix ``density``. ``er`` (Erdős–Rényi, as in SET and
  RigL) makes a ``[n_in, n_out]`` matrix's density proportional to
  ``(n_in + n_out) / (n_in * n_out)``, scaled by an epsilon solved so that the
  total number of weights equals ``density`` times the total; matrices that
  would exceed density 1 are made dense and epsilon is solved again.
  """
  validate_density(density)
  if sparse_init not in SPARSE_INITS:
    raise ConfigError(f'unknown sparse_init {sparse_init!r}; expected one of {SPARSE_INITS}')
  leaves = _sparse_leaves(params, is_sparse)
  if sparse_init == 'uniform':
    return {path: float(density) for path in leaves}
  sizes = {path: leaf.size for path, leaf in leaves.items()}
  raw = {path: sum(leaf.shape) / leaf.size for path, leaf in leaves.items()}
  target = density * sum(sizes.values())
  dense: set = set()
  while True:
    free = [p for p in leaves if p not in dense]
    budget = target - sum(sizes[p] for p in dense)
    epsilon = budget / sum(raw[p] * sizes[p] for p in free)
    over = [p for p in free if epsilon * raw[p] > 1.0]
    if not over:
      break
    dense.update(over)
  return {p: 1.0 if p in dense else epsilon * raw[p] for p in leaves}


def mask_budgets(params: PyTree, density: float, sparse_init: str = 'uniform',
                 is_sparse: LeafPredicate = default_is_sparse) -> dict[tuple, int]:
  """Exact number of active weights per masked leaf (at least one each)."""
  densities = leaf_densities(params, density, sparse_init, is_sparse)
  leaves = _sparse_leaves(params, is_sparse)
  return {p: max(1, min(leaves[p].size, int(round(d * leaves[p].size))))
          for p, d in densities.items()}


def init_masks(key: jax.Array, params: PyTree, density: float, sparse_init: str = 'uniform',
               is_sparse: LeafPredicate = default_is_sparse) -> Masks:
  """Random masks with exactly the :func:`mask_budgets` count in each leaf.

  Positions are drawn uniformly without replacement (the reference draws
  Bernoulli(density) per entry, whose count drifts; here each matrix's
  parameter count is exact from the first step).
  """
  budgets = mask_budgets(params, density, sparse_init, is_sparse)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(flat))
  leaves = []
  for leaf_key, (path, leaf) in zip(keys, flat):
    if path not in budgets:
      leaves.append(None)
      continue
    everywhere = jnp.ones(leaf.shape, bool)
    leaves.append(select.random_subset(leaf_key, everywhere, budgets[path], leaf.size))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def active_counts(masks: Masks) -> dict[str, int]:
  """Active weights per masked leaf, keyed by ``jax.tree_util.keystr`` path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
  return {jax.tree_util.keystr(path): int(np.sum(m)) for path, m in flat if m is not None}


def parameter_count(params: PyTree, masks: Masks) -> int:
  """Weights that exist: active entries of masked leaves plus every dense leaf."""
  total = 0
  for mask, param in zip(jax.tree.leaves(masks, is_leaf=is_none), jax.tree.leaves(params)):
    total += param.size if mask is None else int(np.sum(np.asarray(mask)))
  return total


def overall_density(masks: Masks) -> float:
  """Active fraction over all masked leaves (1.0 when nothing is masked)."""
  leaves = [m for m in jax.tree.leaves(masks) if m is not None]
  total = sum(m.size for m in leaves)
  return float(sum(int(np.sum(m)) for m in leaves) / total) if total else 1.0


GateLayout = Callable[[tuple, tuple], 'tuple[tuple[str, int], ...] | None']


def gate_densities(masks: Masks, gate_layout: GateLayout) -> dict[str, dict[str, float]]:
  """Density of each gate's block in every fused gate matrix.

  ``gate_layout(names, shape)`` (a model's :meth:`gate_layout`, ``names`` the
  leaf's path of dict keys) gives ``((gate, columns), ...)`` side by side on
  the last axis of a fused kernel, or None for leaves that are not one.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
  result = {}
  for path, mask in flat:
    if mask is None:
      continue
    names = key_names(path)
    blocks = gate_layout(names, tuple(mask.shape))
    if blocks is None:
      continue
    mask = np.asarray(mask)
    if sum(width for _, width in blocks) != mask.shape[-1]:
      raise ValueError(f'gate layout {blocks} does not cover {names} of shape {mask.shape}')
    edges = np.cumsum([width for _, width in blocks])[:-1]
    result[jax.tree_util.keystr(path)] = {
        gate: float(block.mean()) for (gate, _), block in zip(blocks, np.split(mask, edges, -1))}
  return result


def union_masks(masks_a: Masks, masks_b: Masks) -> Masks:
  """Element-wise OR of two mask trees (None stays None): "ever active" so far."""
  return jax.tree.map(lambda a, b: None if a is None else jnp.logical_or(a, b), masks_a, masks_b,
                      is_leaf=is_none)


def itop_rate(ever_active: Masks) -> dict[str, Any]:
  """In-time over-parameterization rate: the fraction of each masked matrix
  (and of all of them) that has been active at some point of training.

  Returns ``{'total': rate, 'per_matrix': {keystr path: rate}}``; a static
  mask keeps the rate at the density, every topology update can only raise it.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(ever_active, is_leaf=is_none)
  per_matrix, active, size = {}, 0, 0
  for path, mask in flat:
    if mask is None:
      continue
    count = int(np.sum(np.asarray(mask)))
    per_matrix[jax.tree_util.keystr(path)] = count / mask.size
    active, size = active + count, size + mask.size
  return {'total': active / size if size else 1.0, 'per_matrix': per_matrix}


def summarize(masks: Masks, gate_layout: GateLayout) -> Mapping[str, Any]:
  """Overall density, per-leaf counts and per-gate densities, for logging."""
  return {'density': overall_density(masks), 'active': active_counts(masks),
          'gate_density': gate_densities(masks, gate_layout)}
