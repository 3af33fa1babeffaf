"""Sparse connectivity: masks, exact selection, topology updates and distances."""

from selfish_jax.sparsity.distance import nnstd, nnstd_tree, topology_distance
from selfish_jax.sparsity.masks import (SPARSE_INITS, active_counts, apply_masks,
                                        default_is_sparse, dense_masks, gate_densities,
                                        init_masks, itop_rate, key_names, leaf_densities,
                                        map_masked, map_with_masks, mask_budgets,
                                        overall_density, parameter_count, summarize, union_masks)
from selfish_jax.sparsity.topology import (GROWTH_MODES, REMOVAL_MODES, death_rate_schedule,
                                           num_to_remove, update_leaf, update_topology)

__all__ = ['GROWTH_MODES', 'REMOVAL_MODES', 'SPARSE_INITS', 'active_counts', 'apply_masks',
           'death_rate_schedule', 'default_is_sparse', 'dense_masks', 'gate_densities',
           'init_masks', 'itop_rate', 'key_names', 'leaf_densities', 'map_masked',
           'map_with_masks', 'mask_budgets', 'nnstd', 'nnstd_tree', 'num_to_remove',
           'overall_density', 'parameter_count', 'summarize', 'topology_distance', 'union_masks',
           'update_leaf', 'update_topology']
