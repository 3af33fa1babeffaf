"""Language models with fused, maskable gate kernels."""

from selfish_jax.models.lstm import LSTM_GATES, LSTMLayer, StackedLSTMLM, softmax_nll

__all__ = ['LSTM_GATES', 'LSTMLayer', 'StackedLSTMLM', 'softmax_nll']
