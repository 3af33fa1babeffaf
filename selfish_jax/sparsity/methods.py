"""Sparse-training methods behind one API, selected by ``config.method``.

A :class:`Method` says how masks start, when the topology changes, and how:
``update(params, masks, state, key, step, scores) -> (params, masks, state)``
is pure and jittable; ``scores`` are what the method grows by
(:attr:`Method.grows_by`: dense gradients or optimizer momentum); ``state``
holds what a method carries between updates (DSR's threshold). Step-dependent
rates are computed from the traced ``step``, so updates never recompile, and
:meth:`Method.should_update` is traced too, so a whole training can be one
``scan``. Methods are built by their entry of :data:`METHODS` (register your
own there), which also sets their FLOPs rule.

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
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfish_jax.errors import ConfigError
from selfish_jax.sparsity import masks as masks_lib
from selfish_jax.sparsity import select, topology
from selfish_jax.sparsity.masks import Masks

PyTree = Any
UpdateFn = Callable[..., tuple[PyTree, Masks, PyTree]]
FlopsRule = Callable[['Method', float, float, int], float]


# ----------------------------------------------------------------------------- FLOPs rules
#
# Training FLOPs relative to dense, counted like RigL's tables: a sparse step
# is forward + backward = 3 f_S, a step that needs the dense weight gradient
# 2 f_S + f_D, a dense step 3 f_D (f: forward FLOPs per token,
# selfish_jax.flops.forward_flops_per_token).


def dense_steps(method: Method, sparse_forward: float, dense_forward: float,
                total_steps: int) -> float:
  del method, sparse_forward, dense_forward, total_steps
  return 1.0


def sparse_steps(method: Method, sparse_forward: float, dense_forward: float,
                 total_steps: int) -> float:
  """Every step sparse (the dense gradient of one step per update is not counted)."""
  del method, total_steps
  return sparse_forward / dense_forward


def dense_gradient_every_step(method: Method, sparse_forward: float, dense_forward: float,
                              total_steps: int) -> float:
  """Every step needs the dense gradient (a momentum of every weight: SNFS)."""
  del method, total_steps
  return (2.0 * sparse_forward + dense_forward) / (3.0 * dense_forward)


def dense_gradient_at_updates(method: Method, sparse_forward: float, dense_forward: float,
                              total_steps: int) -> float:
  """Sparse steps, but the dense gradient at each of the updates (RigL)."""
  updates = method.last_step // method.every_steps
  cost = ((total_steps - updates) * 3.0 * sparse_forward
          + updates * (2.0 * sparse_forward + dense_forward))
  return cost / total_steps / (3.0 * dense_forward)


def scheduled_density(method: Method, sparse_forward: float, dense_forward: float,
                      total_steps: int) -> float:
  """The mean scheduled density over the run (gradual pruning from dense)."""
  del sparse_forward, dense_forward
  return float(np.mean(np.asarray(method.density_schedule(np.arange(total_steps)))))


@dataclasses.dataclass(frozen=True)
class Method:
  """One sparse-training method, built by its :data:`METHODS` entry.

  Attributes:
    name: the ``config.method`` value.
    density: target density of the masked weights (1 for dense).
    sparse_init: initial mask distribution (``uniform`` or ``er``).
    density_map: per-matrix densities (keystr path -> density) that override
      ``density`` and ``sparse_init`` for the matrices they name.
    start_dense: masks start all-active (gradual pruning).
    grows_by: what ``update`` ranks the regrowth by, passed as its ``scores``:
      ``'gradient'`` (the latest step's dense gradient), ``'momentum'`` (the
      optimizer's first moment, :func:`selfish_jax.optim.first_moment`) or
      None (random regrowth, or none).
    every_steps: update every this many steps (and not at epoch ends); 0 = at epoch ends.
    last_step: no step-based updates after this step.
    update: the topology update, or None for methods that never change it.
    initial_state: the method's state before the first update.
    removal_rate: the fraction of active weights an update at a step removes
      (an optax schedule; DSR's target for its threshold), or None.
    density_schedule: density as a function of the step, for methods whose
      density changes (GMP); None when it stays at ``density``.
    flops: its training FLOPs relative to dense training,
      ``flops(method, sparse_forward, dense_forward, total_steps)`` (see
      :mod:`selfish_jax.flops`).
  """
  name: str
  density: float = 1.0
  sparse_init: str = 'uniform'
  density_map: Mapping[str, float] | None = None
  start_dense: bool = False
  grows_by: str | None = None
  every_steps: int = 0
  last_step: int = 0
  update: UpdateFn | None = None
  initial_state: PyTree = dataclasses.field(default_factory=dict)
  removal_rate: optax.Schedule | None = None
  density_schedule: optax.Schedule | None = None
  flops: FlopsRule = sparse_steps

  @property
  def sparse(self) -> bool:
    return self.name != 'dense'

  def init_masks(self, key: jax.Array, params: PyTree) -> Masks:
    if not self.sparse:
      return masks_lib.dense_masks(params)
    if self.start_dense:
      return masks_lib.init_masks(key, params, 1.0)
    return masks_lib.init_masks(key, params, self.density, self.sparse_init,
                                density_map=self.density_map)

  def should_update(self, step: int | jax.Array, epoch_end: bool = False) -> bool | jax.Array:
    """Whether the topology changes after global step ``step``: a Python bool for
    an int step, a traced bool for a traced one (``lax.cond`` on it inside
    ``scan``). ``epoch_end`` says whether ``step`` ends an epoch."""
    if self.update is None:
      return False
    if self.every_steps:
      return (not epoch_end) & (step % self.every_steps == 0) & (step > 0) & (
          step <= self.last_step)
    return epoch_end

  def updates_at(self, step: int, epoch_end: bool) -> bool:
    """:meth:`should_update` of a host-side step, as a Python bool."""
    return bool(self.should_update(step, epoch_end))

  def training_flops(self, sparse_forward: float, dense_forward: float, total_steps: int
                     ) -> float:
    """Training FLOPs over ``total_steps`` relative to dense training."""
    return self.flops(self, sparse_forward, dense_forward, total_steps)


@dataclasses.dataclass(frozen=True)
class MethodSettings:
  """What a method's factory builds it from (the config's sparsity keys).

  ``death_rate`` is the removal fraction's start (cosine decay per step to
  ``death_rate_final`` for Selfish-RNN, SET, SNFS and DSR; RigL decays it to 0
  at ``end_fraction`` of training and updates every ``every_steps`` steps);
  GMP prunes every ``every_steps`` steps from ``gmp_begin_fraction`` to
  ``end_fraction`` of training. ``growth`` (``random``, ``gradient``,
  ``momentum``) is Selfish-RNN's regrowth criterion, ``growth_ties`` how
  growth by scores orders equal scores (:data:`topology.GROWTH_TIES`).
  """
  density: float
  total_steps: int
  sparse_init: str = 'uniform'
  density_map: Mapping[str, float] | None = None
  death_rate: float = 0.5
  death_rate_final: float = 0.005
  growth: str = 'random'
  growth_ties: str = 'random'
  every_steps: int = 100
  end_fraction: float = 0.75
  gmp_begin_fraction: float = 0.0
  dsr_initial_threshold: float = 1e-3

  @property
  def cosine(self) -> optax.Schedule:
    """The removal fraction's cosine decay over the whole run."""
    return topology.death_rate_schedule(self.death_rate, self.total_steps, self.death_rate_final)

  @property
  def end_step(self) -> int:
    return max(1, int(self.end_fraction * self.total_steps))

  @property
  def common(self) -> dict:
    return dict(density=self.density, sparse_init=self.sparse_init, density_map=self.density_map)


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


def _per_matrix_update(death_rate: optax.Schedule, removal: str, growth: str,
                       ties: str = 'random') -> UpdateFn:
  """Removal and regrowth of ``ceil(rate * active)`` in every matrix (Selfish-RNN, SET, RigL)."""

  def update(params, masks, state, key, step, scores=None):
    new_params, new_masks = topology.update_topology(
        params, masks, key, death_rate(step), growth=growth,
        scores=None if growth == 'random' else scores, removal=removal, ties=ties)
    return new_params, new_masks, state

  return update


def _regrow_budget(flat_params: list, flat_masks: list, survivors: dict[int, jax.Array],
                   total: jax.Array, weights: jax.Array,
                   grow: Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]
                   ) -> tuple[list, list]:
  """Regrows ``total`` weights split over the matrices in ``survivors`` (index -> mask).

  Matrix ``i`` gets a share of ``total`` proportional to its entry of
  ``weights`` (capped by its free positions) and
  ``grow(i, survivors, count, free_count)`` picks the positions the survivors
  leave free. Weights keep their values where active before and after
  (:func:`topology.keep_weights`). Shared by the methods whose budget moves
  between matrices (SNFS, DSR).
  """
  order = list(survivors)
  capacity = jnp.stack([flat_masks[i].size - select.count_true(survivors[i]) for i in order])
  shares = allocate(total, weights, capacity.astype(jnp.int32))
  new_params, new_masks = list(flat_params), list(flat_masks)
  for j, i in enumerate(order):
    new_masks[i] = survivors[i] | grow(i, survivors[i], shares[j], capacity[j])
    new_params[i] = topology.keep_weights(flat_params[i], flat_masks[i], new_masks[i])
  return new_params, new_masks


def _redistributing_update(death_rate: optax.Schedule, ties: str = 'random') -> UpdateFn:
  """SNFS: magnitude removal per matrix; the total regrown by largest momentum,
  split across matrices in proportion to their mean momentum magnitude."""

  def update(params, masks, state, key, step, scores=None):
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
    keys = dict(zip(survivors, jax.random.split(key, len(survivors))))
    grow = lambda i, alive, count, free: topology.grow_by_score(
        flat_scores[i], alive, count, free, keys[i], ties)
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
    grow = lambda i, alive, count, free: select.random_subset(keys[i], alive, count, free,
                                                              complement=True)
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


# ----------------------------------------------------------------------------- the registry


def _dense(settings: MethodSettings) -> Method:
  del settings
  return Method(name='dense', flops=dense_steps)


def _static(settings: MethodSettings) -> Method:
  return Method(name='static', **settings.common)


def _selfish(settings: MethodSettings) -> Method:
  growth = settings.growth
  if growth not in topology.GROWTH_MODES:
    raise ConfigError(f'unknown growth {growth!r}; expected one of {topology.GROWTH_MODES}')
  return Method(name='selfish', **settings.common, grows_by=None if growth == 'random' else growth,
                removal_rate=settings.cosine,
                update=_per_matrix_update(settings.cosine, 'magnitude', growth,
                                          settings.growth_ties),
                flops=dense_gradient_every_step if growth == 'momentum' else sparse_steps)


def _set(settings: MethodSettings) -> Method:
  return Method(name='set', **settings.common, removal_rate=settings.cosine,
                update=_per_matrix_update(settings.cosine, 'set', 'random'))


def _rigl(settings: MethodSettings) -> Method:
  # RigL's drop fraction: cosine from death_rate to 0 at the last update.
  rate = optax.cosine_decay_schedule(settings.death_rate, settings.end_step)
  return Method(name='rigl', **settings.common, grows_by='gradient',
                every_steps=settings.every_steps, last_step=settings.end_step, removal_rate=rate,
                update=_per_matrix_update(rate, 'magnitude', 'gradient', settings.growth_ties),
                flops=dense_gradient_at_updates)


def _snfs(settings: MethodSettings) -> Method:
  return Method(name='snfs', **settings.common, grows_by='momentum',
                removal_rate=settings.cosine,
                update=_redistributing_update(settings.cosine, settings.growth_ties),
                flops=dense_gradient_every_step)


def _dsr(settings: MethodSettings) -> Method:
  return Method(name='dsr', **settings.common, removal_rate=settings.cosine,
                update=_threshold_update(settings.cosine),
                initial_state={'threshold': jnp.float32(settings.dsr_initial_threshold)})


def _gmp(settings: MethodSettings) -> Method:
  every, end = settings.every_steps, settings.end_step
  begin = int(settings.gmp_begin_fraction * settings.total_steps)
  # The schedule ends on an update step, so the last prune reaches the target count exactly.
  prune_end = max(every, end - end % every)
  schedule = gmp_density_schedule(settings.density, begin, prune_end)
  return Method(name='gmp', density=settings.density, start_dense=True, every_steps=every,
                last_step=prune_end, update=_pruning_update(schedule),
                density_schedule=schedule, flops=scheduled_density)


MethodFactory = Callable[[MethodSettings], Method]

# Every method by its config.method name. Register your own (its factory reads
# the MethodSettings it needs; config, experiments.compare and the FLOPs count
# then take it like the others):
#   METHODS['mine'] = lambda settings: Method(name='mine', **settings.common, ...)
METHODS: dict[str, MethodFactory] = {
    'dense': _dense, 'static': _static, 'selfish': _selfish, 'set': _set, 'rigl': _rigl,
    'snfs': _snfs, 'dsr': _dsr, 'gmp': _gmp}


def make_method(name: str, **settings: Any) -> Method:
  """The method ``name`` of :data:`METHODS`, built from :class:`MethodSettings`
  (``density`` and ``total_steps`` required), its schedules over ``total_steps``."""
  if name not in METHODS:
    raise ConfigError(f'unknown method {name!r}; expected one of {tuple(METHODS)}')
  settings = MethodSettings(**settings)
  masks_lib.validate_density(settings.density)
  topology.check_growth_ties(settings.growth_ties)
  return METHODS[name](dataclasses.replace(settings, total_steps=max(int(settings.total_steps), 1)))
