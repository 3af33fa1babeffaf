"""Sparse connectivity: masks, exact selection, topology updates, methods and distances.

Per-leaf results are keyed by ``jax.tree_util.keystr`` paths; every measure is
a ``jnp`` function that runs under ``jit``, ``vmap`` and ``scan``.
"""

from selfish_jax.sparsity.distance import (neuron_distances, nnstd, nnstd_tree,
                                           pairwise_topology_distance, topology_distance)
from selfish_jax.sparsity.masks import (SPARSE_INITS, active_counts, apply_masks, check_masks,
                                        default_is_sparse, dense_masks, gate_densities,
                                        host_numbers, init_masks, itop_rate, key_names,
                                        leaf_densities, map_masked, map_with_masks, mask_budgets,
                                        overall_density, parameter_count, sparse_labels,
                                        summarize, union_masks)
from selfish_jax.sparsity.methods import METHODS, Method, MethodSettings, make_method
from selfish_jax.sparsity.topology import (GROWTH_MODES, GROWTH_TIES, REMOVAL_MODES,
                                           death_rate_schedule, num_to_remove, update_leaf,
                                           update_topology)

__all__ = ['GROWTH_MODES', 'GROWTH_TIES', 'METHODS', 'Method', 'MethodSettings',
           'REMOVAL_MODES', 'SPARSE_INITS', 'active_counts', 'apply_masks', 'check_masks',
           'death_rate_schedule', 'default_is_sparse', 'dense_masks', 'gate_densities',
           'host_numbers', 'init_masks', 'itop_rate', 'key_names', 'leaf_densities',
           'make_method', 'map_masked', 'map_with_masks', 'mask_budgets', 'neuron_distances',
           'nnstd', 'nnstd_tree', 'num_to_remove', 'overall_density',
           'pairwise_topology_distance', 'parameter_count', 'sparse_labels', 'summarize',
           'topology_distance', 'union_masks', 'update_leaf', 'update_topology']
