"""Batching exactly like the reference ``word_language_model`` code.

``batchify`` cuts the token stream into ``batch_size`` contiguous columns, and
``bptt_windows`` walks them in windows of ``bptt`` steps, the last window being
shorter. Arrays here are batch-major: ``[batch, tokens]``.
"""

from __future__ import annotations

from typing import Iterator

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
