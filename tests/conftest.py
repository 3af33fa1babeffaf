"""Shared fixtures: the real corpora beside the project, and tiny configs."""

import os
import tempfile

import pytest

# Many tests compile the same tiny programs (in this process and in the
# subprocesses they start): share compilations through JAX's persistent cache.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'selfish_jax_test_jit_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))


@pytest.fixture(scope='session')
def shared_data_dir():
  if not os.path.isdir(os.path.join(SHARED_DATA, 'ptb')):
    pytest.skip(f'no corpora at {SHARED_DATA}')
  return SHARED_DATA


@pytest.fixture
def tiny_config(shared_data_dir):
  """A small LSTM on real PTB: a few windows per epoch, fast on CPU."""
  from experiments.configs import ptb_lstm_small
  config = ptb_lstm_small.get_config()
  config.data_dir = shared_data_dir
  config.download = False
  config.emsize = 16
  config.nhid = 16
  config.batch_size = 4
  config.eval_batch_size = 64
  config.bptt = 10
  config.lr = 5.0
  config.dropout = 0.1
  config.num_epochs = 3
  config.max_steps_per_epoch = 12
  config.log_every = 4
  config.death_rate = 0.5
  return config
