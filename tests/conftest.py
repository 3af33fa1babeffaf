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
# The tests run tiny programs once or twice: compiling them costs far more than
# running them, and LLVM's optimisations are most of the compile time.
XLA_TEST_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {XLA_TEST_FLAGS}'.strip()

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))


@pytest.fixture(scope='session')
def shared_data_dir():
  if not os.path.isdir(os.path.join(SHARED_DATA, 'ptb')):
    pytest.skip(f'no corpora at {SHARED_DATA}')
  return SHARED_DATA


def make_tiny_config(data_dir):
  """A small LSTM on real PTB: a few windows per epoch, fast on CPU."""
  from experiments.configs import ptb_lstm_small
  config = ptb_lstm_small.get_config()
  config.update(data_dir=data_dir, download=False, emsize=16, nhid=16, batch_size=4,
                eval_batch_size=64, bptt=5, lr=5.0, dropout=0.1, num_epochs=3,
                max_steps_per_epoch=12, log_every=4, death_rate=0.5)
  return config


@pytest.fixture
def tiny_config(shared_data_dir):
  return make_tiny_config(shared_data_dir)
