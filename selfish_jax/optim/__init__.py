"""Optimizers: SNT-ASGD as composable optax transforms."""

from selfish_jax.optim.snt_asgd import (SparseAveragingState, averaged_params, is_averaging,
                                        mask_updates, nonmonotone_trigger, snt_asgd,
                                        sparse_averaging, start_averaging)

__all__ = ['SparseAveragingState', 'averaged_params', 'is_averaging', 'mask_updates',
           'nonmonotone_trigger', 'snt_asgd', 'sparse_averaging', 'start_averaging']
