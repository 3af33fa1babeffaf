"""A CPU-sized AWD-LSTM-MoS on WikiText-2 (emsize 32, 128/128/64, 2 experts, bptt ~35)
with the paper row's recipe. The 33,278-word softmax of every expert dominates
its cost on a CPU."""

from experiments.configs import wt2_awd_lstm_mos


def get_config():
  config = wt2_awd_lstm_mos.get_config()
  config.update(emsize=32, nhid=128, nhid_last=64, n_experts=2, bptt=35, max_bptt_delta=10,
                dropout=0.2, dropout_hidden=0.1, dropout_input=0.2, dropout_latent=0.1,
                weight_drop=0.2, num_epochs=15)
  # The mixture's loss tile is rows x n_experts x vocab: 128 rows of 15 experts over
  # WikiText-2's 33,278 words are 255 MB of float32 per chunk.
  config.loss_chunk_rows = 128
  return config
