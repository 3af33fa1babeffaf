"""2x200 stacked LSTM on PTB at density 0.33: the CPU-sized fidelity config.

``--config.method=dense`` gives the dense baseline with the same settings.
"""

from selfish_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = 'ptb'
  config.emsize = 200
  config.nhid = 200
  config.nlayers = 2
  config.tied = False
  config.lr = 20.0
  config.clip = 0.25
  config.dropout = 0.3
  config.batch_size = 20
  config.eval_batch_size = 20
  config.bptt = 35
  config.weight_decay = 1.2e-6
  config.num_epochs = 15
  config.method = 'selfish'
  config.density = 0.33
  config.sparse_init = 'uniform'
  config.death_rate = 0.8
  config.growth = 'random'
  config.nonmono = 5
  config.seed = 1111
  config.lock()
  return config
