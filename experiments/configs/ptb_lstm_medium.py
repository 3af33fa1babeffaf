"""2x650 stacked LSTM on PTB at density 0.33 (a mid-sized benchmark config)."""

from experiments.configs import ptb_lstm_small


def get_config():
  config = ptb_lstm_small.get_config()
  config.emsize = 650
  config.nhid = 650
  config.dropout = 0.5
  config.num_epochs = 40
  return config
