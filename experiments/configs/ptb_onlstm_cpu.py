"""A CPU-sized ON-LSTM (200/400/400/200, chunk 10, bptt ~35) with the paper row's recipe."""

from experiments.configs import ptb_onlstm


def get_config():
  config = ptb_onlstm.get_config()
  config.update(emsize=200, nhid=400, bptt=35, max_bptt_delta=10, dropout_input=0.2,
                dropout_hidden=0.1, dropout=0.2, weight_drop=0.2, num_epochs=15)
  return config
