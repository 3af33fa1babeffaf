"""Masks: a pytree beside the parameters.

``masks`` mirrors ``params``: a boolean array for every masked leaf (embedding,
LSTM kernels, decoder) and ``None`` for dense leaves (biases). Parameters are
kept masked, i.e. zero wherever their mask is False, so models use them as they
are and no per-step mask product is needed in the forward pass.

Every per-leaf result here is a dict keyed by the leaf's
``jax.tree_util.keystr`` path (``"['lstm_0']['input_kernel']"``), and every
measure (counts, densities, ITOP rate, gate densities) is a ``jnp`` function
that runs inside ``jit``, ``vmap`` and ``scan``; ``jax.device_get`` and
``float`` make host numbers of them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def check_masks(masks: Masks) -> None:
  """Raises TypeError naming the first mask leaf that is not boolean.

  A ``uint8`` or ``int32`` mask (jaxpruner's dtype) would be combined with
  ``&``/``~`` bitwise and silently select the wrong weights; a float one would
  fail far from here. Runs at trace time: free under ``jit``.
  """
  for path, mask in jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)[0]:
    if mask is not None and getattr(mask, 'dtype', None) != jnp.bool_:
      dtype = getattr(mask, 'dtype', type(mask).__name__)
      raise TypeError(f'the mask of {jax.tree_util.keystr(path)} has dtype {dtype}; masks must be '
                      'bool (convert with jax.tree.map(lambda m: m.astype(bool), masks))')


def is_masked_node(x: Any) -> bool:
  """Whether ``x`` is ``optax.MaskedNode``: a parameter another group of
  ``optax.partition``/``multi_transform`` owns, which a tree map passes through."""
  return isinstance(x, optax.MaskedNode)


def map_with_masks(fn: Callable[..., Any], tree: PyTree, masks: Masks | None,
                   *rest: PyTree) -> PyTree:
  """``fn(leaf, mask_or_None, *rest_leaves)`` over ``tree``; ``masks=None`` means all dense.

  Leaves of ``tree`` that are ``optax.MaskedNode`` (the parameters another
  group of ``optax.partition``/``multi_transform`` owns) are passed through.
  """
  guarded = lambda x, m, *r: x if is_masked_node(x) else fn(x, m, *r)
  if masks is None:
    return jax.tree.map(lambda x, *r: guarded(x, None, *r), tree, *rest, is_leaf=is_masked_node)
  check_masks(masks)
  return jax.tree.map(lambda m, x, *r: guarded(x, m, *r), masks, tree, *rest, is_leaf=is_none)


def map_masked(fn: Callable[..., Any], params: PyTree, masks: Masks, *rest: PyTree) -> PyTree:
  """``fn(param, mask, *rest)`` on masked leaves; the param unchanged on dense leaves."""
  return map_with_masks(lambda p, m, *r: p if m is None else fn(p, m, *r), params, masks, *rest)


def flatten_with_masks(masks: Masks, *trees: PyTree | None) -> tuple[list, Any, list[list]]:
  """``(mask leaves, treedef, [leaves of each tree])`` aligned on the masks' structure.

  A tree given as None flattens to a list of None, one per mask leaf.
  """
  check_masks(masks)
  flat_masks, treedef = jax.tree_util.tree_flatten(masks, is_leaf=is_none)
  return flat_masks, treedef, [treedef.flatten_up_to(t) if t is not None
                               else [None] * len(flat_masks) for t in trees]


def apply_masks(params: PyTree, masks: Masks) -> PyTree:
  """Zeroes every masked-out weight."""
  return map_masked(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def dense_masks(params: PyTree) -> Masks:
  """Masks with no masked leaf (the dense model)."""
  return jax.tree.map(lambda _: None, params)


def sparse_labels(masks: Masks, sparse: str = 'sparse', dense: str = 'dense') -> PyTree:
  """``sparse`` for every masked leaf, ``dense`` for the others: the labels of
  ``optax.partition({'sparse': ..., 'dense': ...}, sparse_labels(masks))``."""
  return jax.tree.map(lambda m: dense if m is None else sparse, masks, is_leaf=is_none)


def _sparse_leaves(params: PyTree, is_sparse: LeafPredicate) -> dict[str, jax.Array]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {jax.tree_util.keystr(path): leaf for path, leaf in flat if is_sparse(path, leaf)}


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def validate_density(density: float | jax.Array, name: str = 'density') -> None:
  """Raises ConfigError unless ``density`` is in (0, 1] (a traced density is not checked)."""
  if _is_traced(density):
    return
  if not (isinstance(density, (int, float, np.floating)) and 0.0 < density <= 1.0):
    raise ConfigError(f'{name} must be in (0, 1], got {density!r}')


def leaf_densities(params: PyTree, density: float | jax.Array, sparse_init: str = 'uniform',
                   is_sparse: LeafPredicate = default_is_sparse,
                   density_map: Mapping[str, float] | None = None) -> dict[str, Any]:
  """Per-matrix densities (keyed by keystr path) whose weighted mean is ``density``.

  ``uniform`` gives every matrix ``density``. ``er`` (Erdős–Rényi, as in SET and
  RigL) makes a ``[n_in, n_out]`` matrix's density proportional to
  ``(n_in + n_out) / (n_in * n_out)``, scaled by an epsilon solved so that the
  total number of weights equals ``density`` times the total; matrices that
  would exceed density 1 are made dense and epsilon is solved again.

  ``density_map`` (keystr path -> density in (0, 1]) fixes the density of the
  matrices it names (1: every weight active); ``density`` and ``sparse_init``
  then apply to the others alone. ``density`` may be traced (a vmapped
  sweep); the densities are then traced too.
  """
  validate_density(density)
  if sparse_init not in SPARSE_INITS:
    raise ConfigError(f'unknown sparse_init {sparse_init!r}; expected one of {SPARSE_INITS}')
  leaves = _sparse_leaves(params, is_sparse)
  fixed = dict(density_map or {})
  unknown = sorted(set(fixed) - set(leaves))
  if unknown:
    raise ConfigError(f'density_map names {unknown}, which are not masked matrices; expected '
                      f'some of {sorted(leaves)}')
  for name, value in fixed.items():
    validate_density(value, f'the density of {name}')
  free = [p for p in leaves if p not in fixed]
  if sparse_init == 'uniform' or not free:
    return {p: fixed.get(p, density) for p in leaves}
  # ER over the free matrices. The same arithmetic on host floats (a concrete
  # density: exactly the counts of earlier versions) or on jnp values (traced).
  if _is_traced(density):
    xp, total = jnp, jnp.sum
  else:  # float64, summed in order: exactly the densities of earlier versions
    xp, total = np, lambda values: sum(values.tolist())
  sizes = xp.asarray([float(leaves[p].size) for p in free])
  raw = xp.asarray([sum(leaves[p].shape) / leaves[p].size for p in free])
  target = density * total(sizes)

  def epsilon_of(dense):
    budget = target - total(xp.where(dense, sizes, 0.0))
    return budget / total(xp.where(dense, 0.0, raw * sizes))

  dense = xp.zeros(len(free), bool)
  for _ in range(len(free)):  # each round makes at least one more matrix dense, or none
    dense = dense | (epsilon_of(dense) * raw > 1.0)
  densities = xp.where(dense, 1.0, epsilon_of(dense) * raw)
  result = {p: fixed[p] for p in fixed}
  result.update({p: float(d) if xp is np else d for p, d in zip(free, densities)})
  return {p: result[p] for p in leaves}


def mask_budgets(params: PyTree, density: float | jax.Array, sparse_init: str = 'uniform',
                 is_sparse: LeafPredicate = default_is_sparse,
                 density_map: Mapping[str, float] | None = None) -> dict[str, Any]:
  """Exact number of active weights per masked leaf (at least one each), keyed
  by keystr path; int32 arrays where the density is traced."""
  densities = leaf_densities(params, density, sparse_init, is_sparse, density_map)
  leaves = _sparse_leaves(params, is_sparse)
  budgets = {}
  for p, d in densities.items():
    size = leaves[p].size
    budgets[p] = (jnp.clip(jnp.round(d * size), 1, size).astype(jnp.int32) if _is_traced(d)
                  else max(1, min(size, int(round(d * size)))))
  return budgets


def init_masks(key: jax.Array, params: PyTree, density: float | jax.Array,
               sparse_init: str = 'uniform', is_sparse: LeafPredicate = default_is_sparse,
               density_map: Mapping[str, float] | None = None) -> Masks:
  """Random masks with exactly the :func:`mask_budgets` count in each leaf.

  Positions are drawn uniformly without replacement (the reference draws
  Bernoulli(density) per entry, whose count drifts; here each matrix's
  parameter count is exact from the first step). ``density`` may be traced
  (``jax.vmap(lambda d: init_masks(key, params, d))(densities)``).
  """
  budgets = mask_budgets(params, density, sparse_init, is_sparse, density_map)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(flat))
  leaves = []
  for leaf_key, (path, leaf) in zip(keys, flat):
    name = jax.tree_util.keystr(path)
    if name not in budgets:
      leaves.append(None)
      continue
    everywhere = jnp.ones(leaf.shape, bool)
    leaves.append(select.random_subset(leaf_key, everywhere, budgets[name], leaf.size))
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- measures


def _masked_leaves(masks: Masks) -> list[tuple[str, jax.Array]]:
  check_masks(masks)
  flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
  return [(jax.tree_util.keystr(path), m) for path, m in flat if m is not None]


def _count(mask: jax.Array) -> jax.Array:
  return jnp.sum(mask, dtype=jnp.int32)


def active_counts(masks: Masks) -> dict[str, jax.Array]:
  """Active weights per masked leaf (int32)."""
  return {name: _count(m) for name, m in _masked_leaves(masks)}


def parameter_count(params: PyTree, masks: Masks) -> jax.Array:
  """Weights that exist: active entries of masked leaves plus every dense leaf."""
  total = jnp.int32(0)
  for mask, param in zip(jax.tree.leaves(masks, is_leaf=is_none), jax.tree.leaves(params)):
    total = total + (param.size if mask is None else _count(mask))
  return total


def overall_density(masks: Masks) -> jax.Array:
  """Active fraction over all masked leaves (1 when nothing is masked)."""
  leaves = [m for _, m in _masked_leaves(masks)]
  total = sum(m.size for m in leaves)
  if not total:
    return jnp.float32(1.0)
  return sum(_count(m) for m in leaves).astype(jnp.float32) / total


GateLayout = Callable[[tuple, tuple], 'tuple[tuple[str, int], ...] | None']


def _gate_layouts(masks: Masks, gate_layout: GateLayout
                  ) -> list[tuple[str, jax.Array, tuple[tuple[str, int], ...]]]:
  """``(keystr path, mask, ((gate, columns), ...))`` of every fused gate matrix.

  ``gate_layout(names, shape)`` (a model's :meth:`gate_layout`, ``names`` the
  leaf's path of dict keys) gives ``((gate, columns), ...)`` side by side on
  the last axis of a fused kernel, or None for leaves that are not one.
  """
  check_masks(masks)
  flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
  layouts = []
  for path, mask in flat:
    if mask is None:
      continue
    names = key_names(path)
    layout = gate_layout(names, tuple(mask.shape))
    if layout is None:
      continue
    if sum(width for _, width in layout) != mask.shape[-1]:
      raise ValueError(f'gate layout {layout} does not cover {names} of shape {mask.shape}')
    layouts.append((jax.tree_util.keystr(path), mask, tuple(layout)))
  return layouts


def _gate_blocks(masks: Masks, gate_layout: GateLayout) -> list[tuple[str, str, jax.Array]]:
  """``(keystr path, gate, block of the mask)`` of every gate of every fused matrix."""
  blocks = []
  for name, mask, layout in _gate_layouts(masks, gate_layout):
    edges = np.cumsum([width for _, width in layout])[:-1].tolist()
    blocks += [(name, gate, block)
               for (gate, _), block in zip(layout, jnp.split(mask, edges, -1))]
  return blocks


def gate_densities(masks: Masks, gate_layout: GateLayout) -> dict[str, dict[str, jax.Array]]:
  """Density of each gate's block in every fused gate matrix (float32)."""
  result = {}
  for name, gate, block in _gate_blocks(masks, gate_layout):
    result.setdefault(name, {})[gate] = _count(block).astype(jnp.float32) / block.size
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
  leaves = _masked_leaves(ever_active)
  per_matrix = {name: _count(m).astype(jnp.float32) / m.size for name, m in leaves}
  return {'total': overall_density(ever_active), 'per_matrix': per_matrix}


@functools.partial(jax.jit, static_argnums=2)
def _counts(masks: Masks, ever_active: Masks | None, gate_layout: GateLayout | None):
  gates = {}
  for name, gate, block in _gate_blocks(masks, gate_layout) if gate_layout else ():
    gates.setdefault(name, {})[gate] = (_count(block), block.size)
  return (active_counts(masks), None if ever_active is None else active_counts(ever_active),
          gates)


def summarize(masks: Masks, gate_layout: GateLayout | None = None,
              ever_active: Masks | None = None) -> dict[str, Any]:
  """The mask statistics a run records, as host numbers (one compiled counting
  pass, ratios taken in float64): ``density``, ``active`` (per leaf),
  ``gate_density`` (per fused matrix and gate) and, given ``ever_active``,
  ``itop_rate`` and ``itop_rate_per_matrix``. ``gate_layout`` must be
  hashable (a model's bound method is)."""
  active, ever, gates = jax.device_get(_counts(masks, ever_active, gate_layout))
  sizes = {name: m.size for name, m in _masked_leaves(masks)}
  total = sum(sizes.values())
  ratio = lambda counts: sum(int(c) for c in counts.values()) / total if total else 1.0
  # In the layout's order (i, f, g, o), which the compiled program's sorted dicts lose.
  gate_density = {name: {gate: int(gates[name][gate][0]) / int(gates[name][gate][1])
                         for gate, _ in layout}
                  for name, _, layout in (_gate_layouts(masks, gate_layout) if gate_layout else ())}
  summary = {'density': ratio(active), 'active': {k: int(v) for k, v in active.items()},
             'gate_density': gate_density}
  if ever is not None:
    summary['itop_rate'] = ratio(ever)
    summary['itop_rate_per_matrix'] = {k: int(v) / sizes[k] for k, v in ever.items()}
  return summary


def host_numbers(tree: PyTree) -> PyTree:
  """``tree`` of device scalars as Python numbers (for records and logs)."""
  return jax.tree.map(lambda x: np.asarray(x).item(), jax.device_get(tree))
