"""Batching exactly like the reference ``word_language_model`` code.

``batchify`` cuts the token stream into ``batch_size`` contiguous columns, and
``bptt_windows`` walks them in windows of ``bptt`` steps, the last window being
shorter. Arrays here are batch-major: ``[batch, tokens]``. :class:`Windows`
holds a split's (or an epoch's) windows padded to one length, as the jitted
steps take them: fixed-length (:func:`make_windows`) or AWD-LSTM's variable
lengths (:func:`make_variable_windows`).
"""

from __future__ import annotations

from typing import Iterator

import flax.struct
import jax
import numpy as np


def batchify(tokens: np.ndarray, batch_size: int) -> np.ndarray:
  """``[batch_size, n // batch_size]`` columns of the stream, remainder dropped."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  steps = len(tokens) // batch_size
  if steps < 2:
    raise ValueError(f'{len(tokens)} tokens are too few for batch size {batch_size}')
  return np.ascontiguousarray(tokens[:steps * batch_size].reshape(batch_size, steps))


def num_windows(columns: np.ndarray, bptt: int) -> int:
  """Number of BPTT windows in one pass over ``columns``."""
  return -(-(columns.shape[1] - 1) // bptt)


def window(columns: np.ndarray, index: int, bptt: int) -> tuple[np.ndarray, np.ndarray]:
  """Inputs and next-token targets of window ``index``, each ``[batch, <=bptt]``."""
  start = index * bptt
  length = min(bptt, columns.shape[1] - 1 - start)
  if length <= 0:
    raise IndexError(f'window {index} is past the end ({num_windows(columns, bptt)} windows)')
  return (columns[:, start:start + length], columns[:, start + 1:start + 1 + length])


def bptt_windows(columns: np.ndarray, bptt: int, start: int = 0
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Yields ``(index, inputs, targets)`` for windows ``start, start+1, ...``."""
  for index in range(start, num_windows(columns, bptt)):
    inputs, targets = window(columns, index, bptt)
    yield index, inputs, targets


class Windows(flax.struct.PyTreeNode):
  """BPTT windows of a split, padded to one length: ``[num_windows, batch, length]``.

  ``weights`` is 1 for real target tokens and 0 for padding. Padding sits
  after a window's real tokens (the last fixed-length window is shorter;
  under variable BPTT every window is padded to ``bptt + max_delta``), so it
  changes neither the loss nor the gradient of a causal model, and the
  recurrences hold their state through it.
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
  n = num_windows(columns, bptt)
  batch = columns.shape[0]
  inputs = np.zeros((n, batch, bptt), np.int32)
  targets = np.zeros((n, batch, bptt), np.int32)
  weights = np.zeros((n, batch, bptt), np.float32)
  for index, x, y in bptt_windows(columns, bptt):
    length = x.shape[1]
    inputs[index, :, :length] = x
    targets[index, :, :length] = y
    weights[index, :, :length] = 1.0
  return Windows(inputs, targets, weights)


def make_variable_windows(columns: np.ndarray, bptt: int, max_delta: int,
                          rng: np.random.Generator) -> tuple[Windows, np.ndarray]:
  """AWD-LSTM's variable-length BPTT windows of one epoch, and their lr factors.

  Each window is ``bptt`` long with probability 0.95, else ``bptt / 2``, plus
  ``N(0, 5)`` steps, then at least 5 and at most ``bptt + max_delta``; its lr
  factor is that length over ``bptt`` (the last window keeps the factor of its
  drawn length, as the reference does). Every window is padded to
  ``bptt + max_delta`` steps, so one compiled step serves them all.
  """
  last = columns.shape[1] - 1
  plan, start = [], 0
  while start < last:
    base = bptt if rng.random() < 0.95 else bptt / 2.0
    length = min(max(5, int(rng.normal(base, 5))), bptt + max_delta)
    plan.append((start, min(length, last - start), length / bptt))
    start += length
  batch, width = columns.shape[0], bptt + max_delta
  inputs = np.zeros((len(plan), batch, width), np.int32)
  targets = np.zeros((len(plan), batch, width), np.int32)
  weights = np.zeros((len(plan), batch, width), np.float32)
  for index, (start, length, _) in enumerate(plan):
    inputs[index, :, :length] = columns[:, start:start + length]
    targets[index, :, :length] = columns[:, start + 1:start + 1 + length]
    weights[index, :, :length] = 1.0
  return Windows(inputs, targets, weights), np.array([f for _, _, f in plan], np.float32)
