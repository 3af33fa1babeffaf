"""Atomic checkpoints with orbax: the latest train state, and the best weights.

``WORKDIR/checkpoints/<step>`` holds the full :class:`TrainState` (params,
masks, optimizer state with SNT-ASGD averages and counters, LSTM carry) and a
JSON record of the loop's host state (epoch, position in the epoch, trigger
history, best validation loss). ``WORKDIR/best/<epoch>`` holds the weights that
scored best on validation (the averaged ones once SNT-ASGD is on), and
``WORKDIR/switch/<step>`` the state, host state and best weights at the end
of the epoch whose validation switched averaging on (what other optimizers
fork from). Orbax writes
into a temporary folder and renames it when complete, so an interrupted save
never replaces a good checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from selfish_jax import storage

PyTree = Any


def _manager(directory: str) -> ocp.CheckpointManager:
  # A local folder is made absolute; an object-store URL (gs://...) stays as it is.
  return ocp.CheckpointManager(
      directory if storage.is_object_store(directory) else os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
  """The latest-state and best-weights checkpoints of one workdir."""

  def __init__(self, workdir: str):
    self._latest = _manager(os.path.join(workdir, 'checkpoints'))
    self._best = _manager(os.path.join(workdir, 'best'))
    self._switch = _manager(os.path.join(workdir, 'switch'))

  def save_latest(self, step: int, state: PyTree, host_state: dict) -> None:
    _save_state(self._latest, step, state, host_state)

  def latest_step(self) -> int | None:
    """The step of the latest checkpoint, or None if there is none."""
    return self._latest.latest_step()

  def restore_latest(self, like: PyTree) -> tuple[PyTree, dict] | None:
    """``(state, host_state)`` of the latest checkpoint, or None if there is none."""
    restored = _restore_state(self._latest, like)
    return None if restored is None else (restored['state'], restored['host'])

  def latest_masks(self) -> PyTree | None:
    """The masks of the latest checkpoint, read without the model (nested dicts
    of arrays, None for dense leaves), or None if there is no checkpoint."""
    step = self._latest.latest_step()
    if step is None:
      return None
    restored = self._latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    return restored['state']['masks']

  def save_switch(self, step: int, state: PyTree, host_state: dict, best: PyTree) -> None:
    """Saves where averaging switched on: the state, the host state, and the best
    weights so far (a continuation's test must not miss an earlier best)."""
    _save_state(self._switch, step, state, host_state, best=best)

  def restore_switch(self, like: PyTree) -> tuple[PyTree, dict, PyTree] | None:
    """``(state, host_state, best weights)`` where averaging was switched on, or None."""
    restored = _restore_state(self._switch, like, best=like.params)
    return None if restored is None else (restored['state'], restored['host'], restored['best'])

  def save_best(self, epoch: int, weights: PyTree) -> None:
    self._best.save(epoch, args=ocp.args.StandardSave(weights), force=True)
    self._best.wait_until_finished()

  def restore_best(self, like: PyTree) -> PyTree | None:
    epoch = self._best.latest_step()
    if epoch is None:
      return None
    return self._best.restore(epoch, args=ocp.args.StandardRestore(_abstract(like)))

  def close(self) -> None:
    self._latest.close()
    self._best.close()
    self._switch.close()


def _save_state(manager: ocp.CheckpointManager, step: int, state: PyTree, host_state: dict,
                **trees: PyTree) -> None:
  """Saves ``state``, the JSON ``host_state`` and any further named ``trees``."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state),
      **{name: ocp.args.StandardSave(tree) for name, tree in trees.items()}), force=True)
  manager.wait_until_finished()


def _restore_state(manager: ocp.CheckpointManager, like: PyTree, **tree_likes: PyTree):
  """The items of the latest :func:`_save_state` (``'state'``, ``'host'`` and
  the trees named in ``tree_likes``, each shaped like its value), or None."""
  step = manager.latest_step()
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(like)), host=ocp.args.JsonRestore(),
      **{name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in tree_likes.items()}))
