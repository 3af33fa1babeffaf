"""The paper's stacked LSTM: 2x1500 on PTB at density 0.33 (val/test 73.79/71.65).

Settings of the official command: lr 40, clip 0.25, dropout 0.65, death rate
0.8, random growth, magnitude removal, nonmono 5, 100 epochs, seed 1111.
"""

from experiments.configs import ptb_lstm_small


def get_config():
  config = ptb_lstm_small.get_config()
  config.emsize = 1500
  config.nhid = 1500
  config.lr = 40.0
  config.dropout = 0.65
  config.num_epochs = 100
  config.death_rate = 0.8
  config.density = 0.33
  config.seed = 1111
  return config
