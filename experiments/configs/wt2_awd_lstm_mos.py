"""The paper's AWD-LSTM-MoS row on WikiText-2 at density 0.45 (reported val/test
65.96/63.05, without finetuning).

The MoS paper's WikiText-2 command: emsize 300, 3 layers 1150/1150/650, 15
experts, dropouts output 0.4 / between layers 0.2 / input 0.55 / embedding 0.1
/ latent 0.29, DropConnect 0.5, AR 2, TAR 1, batch 15, variable bptt 70 (at most
+20), lr 15, clip 0.25, 1000 epochs, seed 1882, testing with batch 1 (the MoS
script's test_batch_size); Selfish-RNN's death rate 0.5.
The corpus is read from ``../shared/data/wikitext-2`` (downloaded there if missing).
"""

from experiments.configs import ptb_lstm_small


def get_config():
  config = ptb_lstm_small.get_config()
  config.update(dataset='wikitext2', data_dir='../shared/data', model='awd_lstm_mos',
                emsize=300, nhid=1150, nhid_last=650, nlayers=3, n_experts=15, tied=True,
                dropout=0.4, dropout_hidden=0.2, dropout_input=0.55, dropout_embedding=0.1,
                dropout_latent=0.29, weight_drop=0.5, ar_alpha=2.0, tar_beta=1.0,
                batch_size=15, eval_batch_size=10, test_batch_size=1, bptt=70, variable_bptt=True,
                max_bptt_delta=20, lr=15.0, num_epochs=1000, seed=1882, death_rate=0.5,
                density=0.45)
  # The mixture's loss tile is rows x n_experts x vocab: 128 rows of 15 experts over
  # WikiText-2's 33,278 words are 255 MB of float32 per chunk.
  config.loss_chunk_rows = 128
  return config
