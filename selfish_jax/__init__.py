"""selfish_jax: Selfish Sparse RNN Training (Selfish-RNN and SNT-ASGD) in JAX/Flax.

Subpackages, each importable as an attribute (``import selfish_jax;
selfish_jax.optim.snt_asgd(...)``; loaded on first use, so ``import
selfish_jax`` stays cheap): ``data`` (corpora, BPTT windows, tfds builders,
documents for classification), ``models`` (four language-model families
behind one interface: stacked LSTM, RHN, ON-LSTM, AWD-LSTM-MoS; an LSTM
classifier), ``sparsity`` (masks, exact selection, topology updates, methods,
distances), ``optim`` (``sparsify`` for any optax optimizer, SNT-ASGD and the
optimizer axis), ``training`` (the sparse-training core, steps, loop,
checkpoints, metrics, data parallelism, preemption).
"""

import importlib

__version__ = '0.1.0'

_SUBPACKAGES = ('data', 'models', 'sparsity', 'optim', 'training', 'generation', 'flops',
                'config')


def __getattr__(name: str):
  if name in _SUBPACKAGES:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted([*globals(), *_SUBPACKAGES])
