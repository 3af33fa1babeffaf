"""selfish_jax: Selfish Sparse RNN Training (Selfish-RNN and SNT-ASGD) in JAX/Flax.

Subpackages: ``data`` (corpora, BPTT windows, tfds builders, documents for
classification), ``models`` (four language-model families behind one
interface: stacked LSTM, RHN, ON-LSTM, AWD-LSTM-MoS; an LSTM classifier),
``sparsity`` (masks, exact selection, topology updates, methods), ``optim``
(SNT-ASGD and the optimizer axis), ``training`` (steps, loop, checkpoints,
metrics, data parallelism, preemption).
"""

__version__ = '0.1.0'
