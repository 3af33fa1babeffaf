"""Training FLOPs per method, counted like RigL's tables.

Only the weight products count: each active weight of a matrix used once per
token costs 2 FLOPs forward (the embedding is a lookup: 0). A training step is
forward + backward = 3x forward for a sparse step; a step that needs the dense
weight gradient (RigL's update steps, SNFS's momentum every step) costs
``2 f_S + f_D``. GMP trains at its scheduled density, averaged over the run.
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
  dense_step = 3.0 * dense_forward
  if not method.sparse:
    return 1.0
  sparse_step = 3.0 * sparse_forward
  dense_gradient_step = 2.0 * sparse_forward + dense_forward
  if method.scores == 'momentum':  # SNFS, Selfish with momentum growth: every step
    return dense_gradient_step / dense_step
  if method.density_schedule is not None:  # GMP: the cost follows the scheduled density
    densities = np.asarray(method.density_schedule(np.arange(total_steps)))
    return float(np.mean(densities))
  if method.every_steps and method.scores == 'gradient':  # RigL
    updates = method.last_step // method.every_steps
    cost = (total_steps - updates) * sparse_step + updates * dense_gradient_step
    return cost / total_steps / dense_step
  return sparse_step / dense_step
