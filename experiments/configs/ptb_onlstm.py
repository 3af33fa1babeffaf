"""The paper's ON-LSTM row on PTB at density 0.45 (reported val/test 58.17/56.31).

The ON-LSTM paper's settings: layers 400/1150/1150/400, chunk size 10, tied,
DropConnect 0.45 on the recurrent weights, dropouts input 0.5 / between layers
0.3 / output 0.45 / embedding 0.1, AR 2 and TAR 1, variable BPTT around 70,
batch 20, lr 30, clip 0.25, 1000 epochs, seed 141; Selfish-RNN's death rate 0.5.
"""

from experiments.configs import ptb_lstm_small


def get_config():
  config = ptb_lstm_small.get_config()
  config.update(model='onlstm', emsize=400, nhid=1150, nlayers=3, chunk_size=10, tied=True,
                weight_drop=0.45, dropout_input=0.5, dropout_hidden=0.3, dropout=0.45,
                dropout_embedding=0.1, ar_alpha=2.0, tar_beta=1.0, bptt=70, variable_bptt=True,
                batch_size=20, eval_batch_size=10, lr=30.0, num_epochs=1000, seed=141,
                death_rate=0.5, density=0.45)
  return config
