"""Sparse-training methods behind one API, selected by ``config.method``.

A :class:`Method` says how masks start, when the topology changes, and how:
``update(params, masks, state, key, step, scores) -> (params, masks, state)``
is pure and jittable; ``scores`` are dense gradients or optimizer momentum for
the methods that grow by them; ``state`` holds what a method carries between
updates (DSR's threshold). Step-dependent rates are computed from the traced
``step``, so updates never recompile.

| method | masks | removal | regrowth | counts kept |
|---|---|---|---|---|
| dense | none | - | - | - |
| static | random | never | - | per matrix |
| selfish | random | smallest magnitude | random | per matrix |
| set | random | smallest positive / negative closest to 0 | random | per matrix |
| rigl | random, every ΔT steps | smallest magnitude | largest dense gradient | per matrix |
| snfs | random | smallest magnitude | largest momentum; budget split by mean momentum | total |
| dsr | random | below a global adaptive threshold | random; split by surviving weights | total |
| gmp | dense start | smallest magnitude, cubic schedule | none | per matrix |
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from selfish_jax.errors import ConfigError
from selfish_jax.sparsity import masks as masks_lib
from selfish_jax.sparsity import select, topology
from selfish_jax.sparsity.masks import Masks

PyTree = Any
UpdateFn = Callable[..., tuple[PyTree, Masks, PyTree]]

METHODS = ('dense', 'static', 'selfish', 'set', 'rigl', 'snfs', 'dsr', 'gmp')


@dataclasses.dataclass(frozen=True)
class Method:
  """One sparse-training method.

  Attributes:
    name: the ``config.method`` value.
    density: target density of the masked weights (1 for dense).
    sparse_init: initial mask distribution (``uniform`` or ``er``).
    start_dense: masks start all-active (gradual pruning).
    scores: what ``update`` needs as ``scores``: ``'gradient'``, ``'momentum'`` or None.
    every_steps: update every this many steps (and not at epoch ends); 0 = at epoch ends.
    last_step: no step-based updates after this step.
    update: the topology update, or None for methods that never change it.
    initial_state: the method's state before the first update.
    removal_rate: the fraction of active weights an update at a step removes
      (an optax schedule; DSR's target for its threshold), or None.
    density_schedule: density as a function of the step, for methods whose
      density changes (GMP); None when it stays at ``density``.
  """
  name: str
  density: float = 1.0
  sparse_init: str = 'uniform'
  start_dense: bool = False
  scores: str | None = None
  every_steps: int = 0
  last_step: int = 0
  update: UpdateFn | None = None
  initial_state: PyTree = dataclasses.field(default_factory=dict)
  removal_rate: optax.Schedule | None = None
  density_schedule: optax.Schedule | None = None

  @property
  def sparse(self) -> bool:
    return self.name != 'dense'

  def init_masks(self, key: jax.Array, params: PyTree) -> Masks:
    if not self.sparse:
      return masks_lib.dense_masks(params)
    if self.start_dense:
      return masks_lib.init_masks(key, params, 1.0)
    return masks_lib.init_masks(key, params, self.density, self.sparse_init)

  def updates_at(self, step: int, epoch_end: bool) -> bool:
    """Whether the topology changes after global step ``step`` (host-side)."""
    if self.update is None:
      return False
    if self.every_steps:
      return not epoch_end and step % self.every_steps == 0 and 0 < step <= self.last_step
    return epoch_end


# ----------------------------------------------------------------------------- helpers


def allocate(total: jax.Array, weights: jax.Array, capacity: jax.Array) -> jax.Array:
  """Integer shares of ``total`` proportional to ``weights``, each at most ``capacity``.

  Largest-remainder rounding, then what the caps cut off goes to the entries
  with room left, in proportion again (a few rounds, static). The result sums
  to ``min(total, sum(capacity))`` exactly.
  """
  total = jnp.minimum(jnp.asarray(total, jnp.int32), jnp.sum(capacity))
  shares = jnp.zeros_like(capacity)
  for _ in range(len(capacity) + 1):
    room = capacity - shares
    left = total - jnp.sum(shares)
    w = jnp.where(room > 0, jnp.maximum(weights, 0.0), 0.0)
    w = jnp.where(jnp.sum(w) > 0, w, (room > 0).astype(jnp.float32))
    exact = left.astype(jnp.float32) * w / jnp.maximum(jnp.sum(w), 1e-30)
    base = jnp.floor(exact).astype(jnp.int32)
    remainder = left - jnp.sum(base)
    order = jnp.argsort(-(exact - base))
    bonus = jnp.zeros_like(base).at[order].set(
        (jnp.arange(len(base)) < remainder).astype(jnp.int32))
    shares = shares + jnp.minimum(base + bonus, room)
  return shares


# ----------------------------------------------------------------------------- updates


def _per_matrix_update(death_rate: optax.Schedule, removal: str, growth: str) -> UpdateFn:
  """Removal and regrowth of ``ceil(rate * active)`` in every matrix (Selfish-RNN, SET, RigL)."""

  def update(params, masks, state, key, step, scores=None):
    new_params, new_masks = topology.update_topology(
        params, masks, key, death_rate(step), growth=growth,
        scores=None if growth == 'random' else scores, removal=removal)
    return new_params, new_masks, state

  return update


def _regrow_budget(flat_params: list, flat_masks: list, survivors: dict[int, jax.Array],
                   total: jax.Array, weights: jax.Array,
                   grow: Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]
                   ) -> tuple[list, list]:
  """Regrows ``total`` weights split over the matrices in ``survivors`` (index -> mask).

  Matrix ``i`` gets a share of ``total`` proportional to its entry of
  ``weights`` (capped by its free positions) and
  ``grow(i, eligible, count, free_count)`` picks the positions. Weights keep
  their values where active before and after (:func:`topology.keep_weights`).
  Shared by the methods whose budget moves between matrices (SNFS, DSR).
  """
  order = list(survivors)
  capacity = jnp.stack([flat_masks[i].size - select.count_true(survivors[i]) for i in order])
  shares = allocate(total, weights, capacity.astype(jnp.int32))
  new_params, new_masks = list(flat_params), list(flat_masks)
  for j, i in enumerate(order):
    new_masks[i] = survivors[i] | grow(i, ~survivors[i], shares[j], capacity[j])
    new_params[i] = topology.keep_weights(flat_params[i], flat_masks[i], new_masks[i])
  return new_params, new_masks


def _redistributing_update(death_rate: optax.Schedule) -> UpdateFn:
  """SNFS: magnitude removal per matrix; the total regrown by largest momentum,
  split across matrices in proportion to their mean momentum magnitude."""

  def update(params, masks, state, key, step, scores=None):
    del key
    flat_masks, treedef, (flat_params, flat_scores) = masks_lib.flatten_with_masks(
        masks, params, scores)
    rate = death_rate(step)
    survivors, removed, momentum = {}, 0, []
    for i, (p, m, s) in enumerate(zip(flat_params, flat_masks, flat_scores)):
      if m is None:
        continue
      active = select.count_true(m)
      count = topology.num_to_remove(active, rate)
      survivors[i] = m & ~select.smallest_magnitudes(p, m, count, active)
      removed = removed + count
      momentum.append(jnp.sum(jnp.where(m, jnp.abs(s), 0.0)) / jnp.maximum(active, 1))
    grow = lambda i, eligible, count, free: select.largest_magnitudes(
        flat_scores[i], eligible, count, free)
    new_params, new_masks = _regrow_budget(flat_params, flat_masks, survivors, removed,
                                           jnp.stack(momentum), grow)
    return (jax.tree_util.tree_unflatten(treedef, new_params),
            jax.tree_util.tree_unflatten(treedef, new_masks), state)

  return update


def _threshold_update(death_rate: optax.Schedule, tolerance: float = 0.1) -> UpdateFn:
  """DSR: remove every active weight below one global threshold ``H``; regrow
  as many at random, split across matrices in proportion to their surviving
  weights; then move ``H`` toward removing ``rate * active`` next time
  (double it if too few were removed, halve it if too many)."""

  def update(params, masks, state, key, step, scores=None):
    del scores
    flat_masks, treedef, (flat_params,) = masks_lib.flatten_with_masks(masks, params)
    threshold = state['threshold']
    survivors, kept, removed, active_total = {}, [], 0, 0
    for i, (p, m) in enumerate(zip(flat_params, flat_masks)):
      if m is None:
        continue
      survivors[i] = m & (jnp.abs(p) >= threshold)
      alive = select.count_true(survivors[i])
      active = select.count_true(m)
      removed = removed + active - alive
      active_total = active_total + active
      kept.append(alive)
    keys = dict(zip(survivors, jax.random.split(key, len(survivors))))
    grow = lambda i, eligible, count, free: select.random_subset(keys[i], eligible, count, free)
    new_params, new_masks = _regrow_budget(flat_params, flat_masks, survivors, removed,
                                           jnp.stack(kept).astype(jnp.float32), grow)
    target = death_rate(step) * active_total.astype(jnp.float32)
    removed = removed.astype(jnp.float32)
    threshold = jnp.where(removed < (1 - tolerance) * target, threshold * 2.0,
                          jnp.where(removed > (1 + tolerance) * target, threshold / 2.0, threshold))
    return (jax.tree_util.tree_unflatten(treedef, new_params),
            jax.tree_util.tree_unflatten(treedef, new_masks), {'threshold': threshold})

  return update


def gmp_density_schedule(final_density: float, begin: int, end: int) -> optax.Schedule:
  """Zhu & Gupta's cubic schedule: 1 before ``begin``, ``final_density`` from ``end``."""
  return optax.polynomial_schedule(1.0, final_density, power=3,
                                   transition_steps=max(end - begin, 1), transition_begin=begin)


def _pruning_update(density_schedule: optax.Schedule) -> UpdateFn:
  """GMP: prune each matrix to ``round(density(step) * size)`` by magnitude, no regrowth."""

  def update(params, masks, state, key, step, scores=None):
    del key, scores
    density = density_schedule(step)

    def prune(p, m):
      keep = jnp.round(density * m.size).astype(jnp.int32)
      active = select.count_true(m)
      drop = select.smallest_magnitudes(p, m, jnp.maximum(active - keep, 0), active)
      return m & ~drop

    new_masks = masks_lib.map_with_masks(lambda p, m: None if m is None else prune(p, m),
                                         params, masks)
    return masks_lib.apply_masks(params, new_masks), new_masks, state

  return update


# ----------------------------------------------------------------------------- registry


def make_method(name: str, *, density: float, sparse_init: str = 'uniform',
                death_rate: float = 0.5, death_rate_final: float = 0.005, total_steps: int,
                growth: str = 'random',
                every_steps: int = 100, end_fraction: float = 0.75,
                gmp_begin_fraction: float = 0.0, dsr_initial_threshold: float = 1e-3) -> Method:
  """Builds ``name`` with its schedules over ``total_steps`` training steps.

  ``death_rate`` is the removal fraction's start (cosine decay per step to
  ``death_rate_final`` for Selfish-RNN, SET, SNFS and DSR; RigL decays it to 0
  at ``end_fraction`` of training and updates every ``every_steps`` steps);
  GMP prunes every ``every_steps`` steps from ``gmp_begin_fraction`` to
  ``end_fraction`` of training. ``growth`` (``random``, ``gradient``,
  ``momentum``) is Selfish-RNN's regrowth criterion.
  """
  if name not in METHODS:
    raise ConfigError(f'unknown method {name!r}; expected one of {METHODS}')
  masks_lib.validate_density(density)
  total_steps = max(int(total_steps), 1)
  cosine = topology.death_rate_schedule(death_rate, total_steps, death_rate_final)
  end_step = max(1, int(end_fraction * total_steps))
  common = dict(name=name, density=density, sparse_init=sparse_init)
  if name == 'dense':
    return Method(name='dense')
  if name == 'static':
    return Method(**common)
  if name == 'selfish':
    if growth not in topology.GROWTH_MODES:
      raise ConfigError(f'unknown growth {growth!r}; expected one of {topology.GROWTH_MODES}')
    return Method(**common, scores=None if growth == 'random' else growth, removal_rate=cosine,
                  update=_per_matrix_update(cosine, 'magnitude', growth))
  if name == 'set':
    return Method(**common, removal_rate=cosine, update=_per_matrix_update(cosine, 'set', 'random'))
  if name == 'rigl':
    # RigL's drop fraction: cosine from death_rate to 0 at the last update.
    rigl_rate = optax.cosine_decay_schedule(death_rate, end_step)
    return Method(**common, scores='gradient', every_steps=every_steps, last_step=end_step,
                  removal_rate=rigl_rate,
                  update=_per_matrix_update(rigl_rate, 'magnitude', 'gradient'))
  if name == 'snfs':
    return Method(**common, scores='momentum', removal_rate=cosine,
                  update=_redistributing_update(cosine))
  if name == 'dsr':
    return Method(**common, removal_rate=cosine, update=_threshold_update(cosine),
                  initial_state={'threshold': jnp.float32(dsr_initial_threshold)})
  begin = int(gmp_begin_fraction * total_steps)
  # The schedule ends on an update step, so the last prune reaches the target count exactly.
  prune_end = max(every_steps, end_step - end_step % every_steps)
  density_schedule = gmp_density_schedule(density, begin, prune_end)
  return Method(name='gmp', density=density, start_dense=True, every_steps=every_steps,
                last_step=prune_end, update=_pruning_update(density_schedule),
                density_schedule=density_schedule)
