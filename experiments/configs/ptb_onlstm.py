"""The paper's ON-LSTM row on PTB at density 0.45 (reported val/test 58.17/56.31).

Selfish-RNN's ON-LSTM command (``ONLSTM/main_ONLSTM.py`` with ``--density 0.45
--death-rate 0.5 --batch_size 20 --dropout 0.45 --dropouth 0.3 --dropouti 0.5
--wdrop 0.45 --chunk_size 10 --seed 141 --epoch 1000``) and the script's
defaults for what it does not pass: layers 400/1150/1150/400, tied, embedding
dropout 0.1, AR 2 and TAR 1, variable BPTT around 70, lr 15 (the ON-LSTM
paper's 30 is not what the Selfish-RNN row ran), clip 0.25, nonmono 5.

As the official code: DropConnect unscaled in training and times (1 - p) at
evaluation, AR on the last layer's undropped output (``models/onlstm.py``),
testing with batch 1, and SNT-ASGD started over (new averages, counters at 0)
after epochs 500 and 1000 (``--finetuning``/``--finetuning2``: the paper's
ONLSTM_1000/1300 rows come from those phases) if it is averaging by then.

Where the official code is itself broken, this follows the paper: its ON-LSTM
masks stay all zero (``add_module`` gets no ``sparse_init``), so nothing would
train sparse; here masks start uniform at density 0.45. Its restart calls
``mask.update_optimizer_mask()``, which does not exist (it would crash at the
switch); here the new averages are sparse as SNT-ASGD's always are.
"""

from experiments.configs import ptb_lstm_small


def get_config():
  config = ptb_lstm_small.get_config()
  config.update(model='onlstm', emsize=400, nhid=1150, nlayers=3, chunk_size=10, tied=True,
                weight_drop=0.45, dropout_input=0.5, dropout_hidden=0.3, dropout=0.45,
                dropout_embedding=0.1, ar_alpha=2.0, tar_beta=1.0, bptt=70, variable_bptt=True,
                batch_size=20, eval_batch_size=10, test_batch_size=1, lr=15.0, num_epochs=1000,
                asgd_restart_epochs=(500, 1000), seed=141, death_rate=0.5, density=0.45)
  return config
