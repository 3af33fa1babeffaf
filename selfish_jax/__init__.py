"""selfish_jax: Selfish Sparse RNN Training (Selfish-RNN and SNT-ASGD) in JAX/Flax.

Subpackages: ``data`` (corpora, batching, tfds builders), ``models`` (stacked
LSTM LM), ``sparsity`` (masks, exact selection, topology updates, methods),
``optim`` (SNT-ASGD and the optimizer axis), ``training`` (steps, loop,
checkpoints, metrics, data parallelism).
"""

__version__ = '0.1.0'
