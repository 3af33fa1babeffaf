"""Optimizers: SNT-ASGD as composable optax transforms."""

from selfish_jax.optim.inactive_state import zero_inactive_state
from selfish_jax.optim.optimizers import OPTIMIZERS, make_optimizer, momentum_of
from selfish_jax.optim.snt_asgd import (DenseAveragingState, SparseAveragingState, asgd,
                                        averaged_params, averaging_starts, can_average,
                                        clip_and_decay, dense_averaging, is_averaging,
                                        mask_updates, masked, nonmonotone_trigger,
                                        restart_averaging, scale_by_lr_factor, sgd, snt_asgd,
                                        sparse_averaging, start_averaging)

__all__ = ['OPTIMIZERS', 'make_optimizer', 'momentum_of', 'DenseAveragingState',
           'SparseAveragingState', 'asgd', 'averaged_params', 'averaging_starts', 'can_average',
           'clip_and_decay', 'dense_averaging', 'is_averaging', 'mask_updates', 'masked',
           'nonmonotone_trigger', 'restart_averaging', 'scale_by_lr_factor', 'sgd', 'snt_asgd',
           'sparse_averaging', 'start_averaging', 'zero_inactive_state']
