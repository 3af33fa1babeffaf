"""Optimizers: SNT-ASGD and the others as composable optax transforms.

One transform per file: ``remask`` (the last stage: inactive weights zero),
``averaging`` (SNT-ASGD's sparse averaging, the dense ablation, and queries on
their state), ``lr_factor`` (variable BPTT's per-step factor), ``chain`` (the
one chain every optimizer is), ``snt_asgd`` and ``optimizers`` (the named
optimizers), ``inactive_state`` (moments zeroed at inactive weights).
"""

from selfish_jax.optim.averaging import (DenseAveragingState, SparseAveragingState,
                                         averaged_params, can_average, dense_averaging,
                                         is_averaging, restart_averaging, sparse_averaging,
                                         start_averaging)
from selfish_jax.optim.chain import FIRST_MOMENT, clip_and_decay, sparse_sgd_chain
from selfish_jax.optim.inactive_state import zero_inactive_state
from selfish_jax.optim.lr_factor import scale_by_lr_factor
from selfish_jax.optim.optimizers import OPTIMIZERS, first_moment, make_optimizer
from selfish_jax.optim.remask import mask_updates, remask
from selfish_jax.optim.snt_asgd import asgd, sgd, snt_asgd

__all__ = ['DenseAveragingState', 'SparseAveragingState', 'averaged_params', 'can_average',
           'dense_averaging', 'is_averaging', 'restart_averaging', 'sparse_averaging',
           'start_averaging', 'FIRST_MOMENT', 'clip_and_decay', 'sparse_sgd_chain',
           'zero_inactive_state', 'scale_by_lr_factor', 'OPTIMIZERS', 'first_moment',
           'make_optimizer', 'mask_updates', 'remask', 'asgd', 'sgd', 'snt_asgd']
