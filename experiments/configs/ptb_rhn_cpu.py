"""A CPU-sized RHN (200 units, depth 5) with the paper row's recipe at density 0.472."""

from experiments.configs import ptb_rhn


def get_config():
  config = ptb_rhn.get_config()
  config.update(emsize=200, nhid=200, rhn_depth=5, dropout=0.3, dropout_input=0.3,
                dropout_hidden=0.1, dropout_embedding=0.1, num_epochs=15)
  return config
