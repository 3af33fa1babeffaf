"""The paper's RHN row: 1 layer of 830 units, recurrence depth 10, on PTB at
density 0.472 (reported val/test 62.10/60.35; dense test 65.4).

Selfish-RNN's RHN command (``main.py --model RHN --tied --couple --nlayers 1
--density 0.472 --death-rate 0.5 --clip 0.25 --lr 15 --epochs 500 --dropout
0.65 --dropouth 0.25 --dropouti 0.65 --dropoute 0.2 --emsize 830 --nhid 830``)
and the official ``models.py``: a coupled carry gate, one hidden-state dropout
mask reused across depth and time, and PyTorch ``nn.Linear`` defaults for ``W``
and every ``R_l`` (``rhn_init='selfish_rnn'``: two biases on the depth-0
pre-activation, no negative transform bias, embedding U(-0.1, 0.1)).
``--config.rhn_init=zilly`` gives Zilly et al.'s TensorFlow initialisation
instead. Batch 20 x bptt 35, SNT-ASGD, nonmono 5 (the script's defaults).
"""

from experiments.configs import ptb_lstm_small


def get_config():
  config = ptb_lstm_small.get_config()
  config.update(model='rhn', emsize=830, nhid=830, nlayers=1, rhn_depth=10, tied=True,
                rhn_init='selfish_rnn', dropout=0.65, dropout_input=0.65, dropout_hidden=0.25,
                dropout_embedding=0.2, lr=15.0, num_epochs=500, death_rate=0.5, density=0.472)
  return config
