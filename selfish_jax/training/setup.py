"""The run setup every task shares: :func:`run_task`.

It reads the config and hands each part only what it needs, by name: the
workdir code gets the config to save and check, the method and optimizer
registries their keys (:func:`build_method`, :func:`build_optimizer`), the
core and the loop plain values. The task (language modelling,
classification) has read its own keys when it was built: its data, model,
mesh and batches.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
import ml_collections
import optax

from selfish_jax import optim
from selfish_jax.sparsity import methods
from selfish_jax.sparsity.masks import GateLayout
from selfish_jax.training import workdir as workdir_lib
from selfish_jax.training.core import GradFn, SparseTraining, TrainStep
from selfish_jax.training.loop import LoopSettings, Run, Start, Task
from selfish_jax.training.state import TrainState

PyTree = Any


class RunTask(Task, Protocol):
  """A task as the run setup and the loop use it.

  Attributes:
    description: the start line's account of the task and model.
    steps_per_epoch: nominal training steps an epoch (the method's schedules run
      over ``num_epochs`` of these).
    gate_layout: the model's gate layout (per-gate densities).
    grad_fn: the task's gradient, what the sparse train step applies.
  """
  description: str
  steps_per_epoch: int
  gate_layout: GateLayout
  grad_fn: GradFn

  def init_params(self, key: jax.Array) -> PyTree:
    """The model's initial parameters."""

  def initial_carry(self) -> PyTree:
    """The recurrent state the first training batch starts from (``()``: none)."""

  def place(self, state: TrainState) -> TrainState:
    """The state on the task's devices, as the train step keeps it."""

  def compile(self, train_step: TrainStep, dropout_key: jax.Array) -> None:
    """Jits ``train_step`` (the core's sparse step of :attr:`grad_fn`) and the evaluations."""

  def final_record(self, run: Run) -> dict:
    """The final record's fields, after the last epoch (a language model's test)."""


class RunKeys(NamedTuple):
  """Every random key of a run, derived from its seed alone."""
  params: jax.Array
  masks: jax.Array
  dropout: jax.Array  # the train step folds the step into it
  topology: jax.Array  # each topology update folds its step or epoch into it

  @classmethod
  def from_seed(cls, seed: int) -> 'RunKeys':
    # (A fourth key once drew the dropout of a separate gradient pass; the split
    # stays 4-way so the other keys, and every result, stay the same.)
    init, dropout, topology, _ = jax.random.split(jax.random.key(seed), 4)
    params, masks = jax.random.split(init)
    return cls(params, masks, dropout, topology)


def build_method(config: ml_collections.ConfigDict, steps_per_epoch: int) -> methods.Method:
  """The sparse method the config's sparsity keys describe, scheduled over the whole run."""
  return methods.make_method(
      config.method, density=config.density, sparse_init=config.sparse_init,
      death_rate=config.death_rate, death_rate_final=config.death_rate_final,
      total_steps=config.num_epochs * steps_per_epoch, growth=config.growth,
      growth_ties=config.growth_ties, every_steps=config.update_every,
      end_fraction=config.update_end_fraction)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """The optimizer the config's optimizer keys describe."""
  return optim.make_optimizer(config.optimizer, config.lr, weight_decay=config.weight_decay,
                              clip_norm=config.clip if config.clip > 0 else None,
                              momentum=config.momentum)


def build_core(config: ml_collections.ConfigDict, steps_per_epoch: int,
               gate_layout: GateLayout, topology_key: jax.Array) -> SparseTraining:
  """The sparse-training core of ``config``, for a task of ``steps_per_epoch``
  steps an epoch and a model of ``gate_layout``."""
  return SparseTraining(build_method(config, steps_per_epoch), build_optimizer(config),
                        topology_key=topology_key, gate_layout=gate_layout,
                        nonmono=config.nonmono, asgd_start_epoch=config.asgd_start_epoch,
                        asgd_restart_epochs=config.asgd_restart_epochs)


def run_task(config: ml_collections.ConfigDict, workdir: str,
             make_task: Callable[[], RunTask], start: Start | None = None) -> dict:
  """Trains, evaluates and finishes the task ``make_task()`` builds, as a
  (validated) ``config`` says; resumes from ``workdir``.

  The workdir's lock is taken first, so a second run on it stops before it
  loads data or compiles. Returns the final record.

  Raises:
    Preempted: SIGTERM or Ctrl-C arrived; the state of the step it was noticed
      at is saved.
  """
  lock = workdir_lib.lock_workdir(workdir)
  try:
    task = make_task()
    workdir_lib.open_workdir(workdir, config)
    keys = RunKeys.from_seed(config.seed)
    core = build_core(config, task.steps_per_epoch, task.gate_layout, keys.topology)
    state = task.place(core.init_state(task.init_params(keys.params), keys.masks,
                                       task.initial_carry()))
    task.compile(core.train_step(task.grad_fn), keys.dropout)
  except BaseException:
    lock.release()
    raise
  settings = LoopSettings(config.num_epochs, config.log_every, config.checkpoint_every_steps)
  with Run(workdir, core, state, settings=settings, lock=lock, description=task.description,
           start=start) as run:
    run.train(task)
    return run.finish(task.final_record(run))
