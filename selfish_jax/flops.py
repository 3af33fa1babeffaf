"""Training FLOPs per method, counted like RigL's tables.

Only the weight products count: each active weight of a matrix used once per
token costs 2 FLOPs forward (the embedding is a lookup: 0). How a method's
steps combine sparse and dense work is its own FLOPs rule
(:attr:`selfish_jax.sparsity.methods.Method.flops`, set by its registry entry).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from selfish_jax.sparsity import methods as methods_lib
from selfish_jax.sparsity.masks import is_none, key_names

PyTree = Any


def forward_flops_per_token(params: PyTree, masks: PyTree,
                            weight_uses: Callable[[tuple[str, ...]], int]) -> float:
  """2 x (active weights x uses per token) over the weight matrices.

  ``weight_uses(names)`` is the model's :meth:`weight_uses`: how many times each
  weight of the leaf at that key path multiplies per token (0 for a lookup
  embedding, the number of experts for a mixture-of-softmaxes decoder).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
  flat_params = jax.tree.leaves(params)
  total = 0.0
  for (path, mask), param in zip(flat, flat_params):
    if param.ndim < 2:
      continue  # biases: additions, not counted
    active = param.size if mask is None else int(np.sum(np.asarray(mask)))
    total += 2.0 * active * weight_uses(key_names(path))
  return total


def train_flops_relative(method: methods_lib.Method, sparse_forward: float, dense_forward: float,
                         total_steps: int) -> float:
  """Training FLOPs of ``method`` over the run, relative to dense training."""
  return method.training_flops(sparse_forward, dense_forward, total_steps)
