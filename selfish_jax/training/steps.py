"""Pure train/eval steps and the train state (jitted by the caller)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfish_jax.data import batching

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training, as one pytree.

  Attributes:
    step: global training step (int32).
    params: model parameters, zero wherever their mask is False.
    masks: boolean masks beside ``params`` (``None`` for dense leaves).
    opt_state: optimizer state (SNT-ASGD averages and counters included).
    carry: the LSTM state carried from one BPTT window to the next.
    method_state: what the sparse method carries between updates (DSR's threshold).
  """
  step: jax.Array
  params: PyTree
  masks: PyTree
  opt_state: optax.OptState
  carry: PyTree
  method_state: PyTree


class Windows(flax.struct.PyTreeNode):
  """All BPTT windows of a split, padded to ``bptt``: ``[num_windows, batch, bptt]``.

  ``weights`` is 1 for real target tokens and 0 for padding; only the last
  window is padded, and padding sits after the real tokens, so it changes
  neither the loss nor the gradient of a causal model.
  """
  inputs: jax.Array
  targets: jax.Array
  weights: jax.Array

  @property
  def num_windows(self) -> int:
    return self.inputs.shape[0]

  def __getitem__(self, index) -> 'Windows':
    return Windows(self.inputs[index], self.targets[index], self.weights[index])


def make_windows(columns: np.ndarray, bptt: int) -> Windows:
  """Cuts ``[batch, steps]`` columns into padded windows like the reference."""
  n = batching.num_windows(columns, bptt)
  batch = columns.shape[0]
  inputs = np.zeros((n, batch, bptt), np.int32)
  targets = np.zeros((n, batch, bptt), np.int32)
  weights = np.zeros((n, batch, bptt), np.float32)
  for index, x, y in batching.bptt_windows(columns, bptt):
    length = x.shape[1]
    inputs[index, :, :length] = x
    targets[index, :, :length] = y
    weights[index, :, :length] = 1.0
  return Windows(inputs, targets, weights)


def window_nll(model: nn.Module, params: PyTree, carry: PyTree, window: Windows, *,
               train: bool, key: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
  """Summed NLL of the real (unpadded) tokens of ``window``, and the new carry."""
  rngs = {'dropout': key} if train else {}
  return model.apply({'params': params}, window.inputs, carry, train=train,
                     targets=window.targets, weights=window.weights, rngs=rngs)


def make_train_step(model: nn.Module, tx: optax.GradientTransformationExtraArgs,
                    dropout_key: jax.Array) -> Callable[[TrainState, Windows], tuple]:
  """``train_step(state, window) -> (state, loss)``; jit it at the call site.

  The dropout key of step ``s`` is ``fold_in(dropout_key, s)``, so a resumed
  run draws the same dropout masks as an uninterrupted one.
  """

  def loss_fn(params, state: TrainState, window: Windows, key):
    nll, carry = window_nll(model, params, state.carry, window, train=True, key=key)
    return nll / jnp.sum(window.weights), carry

  def train_step(state: TrainState, window: Windows):
    key = jax.random.fold_in(dropout_key, state.step)
    (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, window, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, masks=state.masks)
    params = optax.apply_updates(state.params, updates)
    carry = jax.lax.stop_gradient(carry)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         carry=carry), loss

  return train_step


def make_gradient_fn(model: nn.Module) -> Callable[[PyTree, PyTree, Windows, jax.Array], PyTree]:
  """``grads(params, carry, window, key)``: the dense gradient of one window (for RigL)."""

  def loss_fn(params, carry, window: Windows, key):
    nll, _ = window_nll(model, params, carry, window, train=True, key=key)
    return nll / jnp.sum(window.weights)

  return jax.grad(loss_fn)


def make_evaluate(model: nn.Module, batch_size: int) -> Callable[[PyTree, Windows], jax.Array]:
  """``evaluate(params, windows) -> mean NLL`` over a whole split, in one scan.

  The hidden state is carried across windows and starts at zero, like the
  reference's ``evaluate``.
  """

  def evaluate(params, windows: Windows):
    def body(carry, window: Windows):
      nll, carry = window_nll(model, params, carry, window, train=False)
      return carry, nll

    _, sums = jax.lax.scan(body, model.initial_carry(batch_size), windows)
    return jnp.sum(sums) / jnp.sum(windows.weights)

  return evaluate


