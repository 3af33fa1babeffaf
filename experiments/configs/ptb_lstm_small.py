"""2x200 stacked LSTM on PTB at density 0.33: the CPU-sized fidelity config.

It is :func:`selfish_jax.config.default_config` itself (every default is this
run's setting: untied, lr 20, clip 0.25, dropout 0.3, batch 20, bptt 35,
15 epochs, selfish at density 0.33, death rate 0.8, random growth, nonmono 5,
seed 1111); ``--config.method=dense`` gives the dense baseline.
"""

from selfish_jax.config import default_config


def get_config():
  return default_config()
