"""Language-model families behind one interface, with fused, maskable gate kernels.

``lstm`` (stacked LSTM), ``rhn`` (Recurrent Highway Network), ``onlstm``
(ON-LSTM) and ``awd_lstm_mos`` (AWD-LSTM with a mixture of softmaxes); see
:mod:`selfish_jax.models.interface`.
"""

from selfish_jax.models.interface import (FAMILIES, MODELS, LanguageModel, OutputHead,
                                          build_model, check_model_config, family_defaults,
                                          eval_nll_sum, init_params, logits, token_nll)
from selfish_jax.models.lstm import LSTM_GATES, LSTMLayer, StackedLSTMLM
from selfish_jax.models.mos import AWDLSTMMoSLM
from selfish_jax.models.onlstm import ONLSTM_GATES, ONLSTMLM
from selfish_jax.models.rhn import RHN_GATES, RHNLM
from selfish_jax.models.softmax import SoftmaxHead, softmax_nll

__all__ = ['FAMILIES', 'MODELS', 'LanguageModel', 'OutputHead', 'build_model',
           'check_model_config', 'family_defaults', 'init_params', 'logits', 'token_nll',
           'eval_nll_sum',
           'SoftmaxHead', 'LSTM_GATES', 'LSTMLayer', 'StackedLSTMLM',
           'AWDLSTMMoSLM', 'ONLSTM_GATES', 'ONLSTMLM', 'RHN_GATES', 'RHNLM', 'softmax_nll']
