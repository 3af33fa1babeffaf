"""The paper's RHN row: 1 layer of 830 units, recurrence depth 10, on PTB at
density 0.472 (reported val/test 62.10/60.35; dense test 65.4).

Zilly et al.'s regularisation (tied weights, word-level embedding dropout 0.2,
locked input and output dropout 0.65, one hidden-state dropout mask 0.25 reused
across depth and time, transform-gate bias -2, U(-0.04, 0.04) initialisation)
with Selfish-RNN's training: lr 15, 500 epochs, death rate 0.5, SNT-ASGD with
clip 0.25. Batch 20 x bptt 35 as Zilly's PTB setup.
"""

from experiments.configs import ptb_lstm_small


def get_config():
  config = ptb_lstm_small.get_config()
  config.update(model='rhn', emsize=830, nhid=830, nlayers=1, rhn_depth=10, tied=True,
                dropout=0.65, dropout_input=0.65, dropout_hidden=0.25, dropout_embedding=0.2,
                lr=15.0, num_epochs=500, death_rate=0.5, density=0.472)
  return config
