"""A language model's pure functions (jitted by the caller): the loss of a BPTT
window, its gradient (the one a sparse train step applies,
:meth:`selfish_jax.training.core.SparseTraining.train_step`), and the
evaluation of a whole split."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from selfish_jax.data.batching import Windows
from selfish_jax import models
from selfish_jax.models import layers
from selfish_jax.training import parallel

PyTree = Any


def window_loss(model: nn.Module, params: PyTree, carry: PyTree, window: Windows, *,
                train: bool, key: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, PyTree]:
  """``(summed NLL of the real tokens, training penalty, new carry)`` of ``window``.

  The penalty is what the model sowed into ``'penalties'`` (AR/TAR; 0 for
  models without, and at evaluation).
  """
  if not train:
    nll, carry = models.eval_nll_sum(model, params, window.inputs, carry, window.targets,
                                     window.weights)
    return nll, jnp.float32(0.0), carry
  (head, carry), collections = model.apply(
      {'params': params}, window.inputs, carry, train=True, weights=window.weights,
      rngs={'dropout': key}, mutable=[layers.PENALTIES])
  return (head.weighted_nll_sum(window.targets, window.weights), layers.total_penalty(collections),
          carry)


GradFn = Callable[[PyTree, PyTree, Windows, jax.Array], tuple[jax.Array, PyTree, PyTree]]


def make_grad_fn(model: nn.Module, mesh: Mesh | None = None, groups: int = 0) -> GradFn:
  """``grad_fn(params, carry, window, key) -> (mean NLL, new carry, gradients)``.

  The gradient is that of the mean NLL plus the model's training penalties.

  With ``groups == 0`` the gradient of the whole batch is one autodiff pass,
  and on a mesh XLA all-reduces the devices' partial gradients: the result
  agrees with one device's up to float reassociation.

  With ``groups > 0`` the batch is cut into ``groups`` equal groups of rows;
  each group's gradient is computed alone (dropout from
  ``fold_in(key, group)``), all of them are gathered on every device and
  summed in group order. The arithmetic is then the same on 1 device and on
  any number of devices dividing ``groups``, so a run gives the same numbers
  whatever the device count (the plain all-reduce does not: at lr 20 training
  is chaotic enough for its rounding differences to move the perplexity by
  several percent within a hundred steps). It costs ``groups`` gradient-sized
  buffers per device and an all-gather instead of an all-reduce.
  """

  if groups == 0:
    def objective(params, carry, window, key):
      nll, penalty, carry = window_loss(model, params, carry, window, train=True, key=key)
      mean_nll = nll / jnp.sum(window.weights)
      return mean_nll + penalty, (mean_nll, carry)

    def grad_fn(params, carry, window, key):
      (_, (loss, carry)), grads = jax.value_and_grad(objective, has_aux=True)(
          params, carry, window, key)
      return loss, carry, grads

    return grad_fn
  if mesh is None:
    raise ValueError('groups > 0 needs the mesh')
  num_devices = mesh.shape[parallel.DATA_AXIS]
  if groups % num_devices:
    raise ValueError(f'{groups} gradient groups do not split over {num_devices} devices')
  local_groups = groups // num_devices
  split = lambda x: x.reshape(local_groups, x.shape[0] // local_groups, *x.shape[1:])
  merge = lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
  gather = lambda x: jax.lax.all_gather(x, parallel.DATA_AXIS, tiled=True)

  def group_objective(params, carry, window, key):
    # Summed NLL plus the penalty weighted by the group's tokens, so the sum
    # over groups divided by all tokens is the mean NLL plus the mean penalty.
    nll, penalty, carry = window_loss(model, params, carry, window, train=True, key=key)
    return nll + penalty * jnp.sum(window.weights), (nll, carry)

  def local(params, carry, window, key):
    first_group = jax.lax.axis_index(parallel.DATA_AXIS) * local_groups

    def one_group(inputs):
      index, carry, window = inputs
      (_, (nll, carry)), grads = jax.value_and_grad(group_objective, has_aux=True)(
          params, carry, window, jax.random.fold_in(key, first_group + index))
      return nll, carry, grads

    nlls, carries, grads = jax.lax.map(one_group, (jnp.arange(local_groups), jax.tree.map(
        split, carry), jax.tree.map(split, window)))
    total_weight = jnp.sum(gather(jnp.sum(window.weights, keepdims=True)))
    grads = jax.tree.map(lambda g: jnp.sum(gather(g), axis=0) / total_weight, grads)
    return jnp.sum(gather(nlls)) / total_weight, jax.tree.map(merge, carries), grads

  batch = PartitionSpec(parallel.DATA_AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), batch, batch, PartitionSpec()),
                       out_specs=(PartitionSpec(), batch, PartitionSpec()), check_vma=False)


def make_evaluate(model: nn.Module, batch_size: int) -> Callable[[PyTree, Windows], jax.Array]:
  """``evaluate(params, windows) -> mean NLL`` over a whole split, in one scan.

  The hidden state is carried across windows and starts at zero, like the
  reference's ``evaluate``.
  """

  def evaluate(params, windows: Windows):
    def body(carry, window: Windows):
      nll, _, carry = window_loss(model, params, carry, window, train=False)
      return carry, nll

    _, sums = jax.lax.scan(body, model.initial_carry(batch_size), windows)
    return jnp.sum(sums) / jnp.sum(windows.weights)

  return evaluate


