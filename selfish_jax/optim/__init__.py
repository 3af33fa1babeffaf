"""Optimizers: SNT-ASGD and any optax optimizer made sparse.

:func:`sparsify` is the entry point: it makes any optax optimizer sparse
(moments zeroed at inactive weights, updates re-masked, or SNT-ASGD's sparse
averaging). ``snt_asgd``, ``asgd`` and ``sgd`` are it over SGD;
:func:`make_optimizer` builds the named ones of :data:`OPTIMIZERS`. The last
stages (``remask``, ``sparse_averaging``, ``dense_averaging``) and the queries
on the averaging state live one per file.
"""

from selfish_jax.optim.averaging import (DenseAveragingState, SparseAveragingState,
                                         averaged_params, can_average, dense_averaging,
                                         is_averaging, restart_averaging, sparse_averaging,
                                         start_averaging)
from selfish_jax.optim.chain import clip_and_decay, sgd_steps
from selfish_jax.optim.lr_factor import scale_by_lr_factor
from selfish_jax.optim.optimizers import (FIRST_MOMENT_FIELDS, OPTIMIZERS, OptimizerEntry,
                                          first_moment, make_optimizer, optimizer_entry)
from selfish_jax.optim.remask import mask_updates, remask
from selfish_jax.optim.snt_asgd import asgd, sgd, snt_asgd
from selfish_jax.optim.sparsify import SparseState, set_masks, sparsify

__all__ = ['DenseAveragingState', 'FIRST_MOMENT_FIELDS', 'OPTIMIZERS', 'OptimizerEntry',
           'SparseAveragingState', 'SparseState', 'asgd', 'averaged_params', 'can_average',
           'clip_and_decay', 'dense_averaging', 'first_moment', 'is_averaging', 'make_optimizer',
           'mask_updates', 'optimizer_entry', 'remask', 'restart_averaging', 'scale_by_lr_factor',
           'set_masks', 'sgd', 'sgd_steps', 'snt_asgd', 'sparse_averaging', 'sparsify',
           'start_averaging']
