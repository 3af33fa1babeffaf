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
# running them: LLVM's optimisations are most of the compile time, and XLA:CPU's
# older elemental emitters compile a tiny train step in two thirds of the time
# of its MLIR fusion emitters.
XLA_TEST_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
# For the few tests whose programs run for seconds: ``jitted.lower(...).compile(
# compiler_options=OPTIMISED)`` compiles one program with LLVM's usual optimisations.
OPTIMISED = {'xla_backend_optimization_level': 2}
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {XLA_TEST_FLAGS}'.strip()

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))


@pytest.fixture(scope='session')
def shared_data_dir():
  """The real corpora, for the tests that check them (token counts, checksums);
  everything else trains on :func:`write_text_corpus`'s generated corpus."""
  if not os.path.isdir(os.path.join(SHARED_DATA, 'ptb')):
    pytest.skip(f'no corpora at {SHARED_DATA}')
  return SHARED_DATA


def write_text_corpus(directory, vocab_size=40, tokens=(20_000, 2_000, 2_000), seed=0):
  """Writes ``{train,valid,test}.txt`` of a small learnable language (``dataset='text'``).

  Sentences follow a fixed random Markov chain whose next word is one of
  three likely successors, so a model's loss falls within a few steps while
  the vocabulary stays tiny (evaluating a 10k-word softmax costs most of a
  family test's time otherwise).
  """
  import numpy as np
  rng = np.random.default_rng(seed)
  successors = rng.integers(0, vocab_size, size=(vocab_size, 3))
  os.makedirs(directory, exist_ok=True)
  for split, count in zip(('train', 'valid', 'test'), tokens):
    words, word = [], 0
    while len(words) < count:
      line = []
      for _ in range(rng.integers(5, 15)):
        word = successors[word, rng.integers(3)]
        line.append(f'w{word}' if word else '<unk>')  # unknown words map to <unk>, as in PTB
      words.extend(line)
      words.append('\n')
    with open(os.path.join(directory, f'{split}.txt'), 'w') as f:
      f.write(' '.join(words).replace(' \n ', '\n'))
  return str(directory)


@pytest.fixture(scope='session')
def text_corpus_dir(tmp_path_factory):
  """A generated corpus folder for ``dataset='text'``."""
  return write_text_corpus(tmp_path_factory.mktemp('text_corpus'))


@pytest.fixture(scope='session')
def gcs():
  """A fake Cloud Storage server on 127.0.0.1 (:mod:`fake_gcs`), one per test
  process: ``gs://bucket/...`` paths in this process reach it, and so do they
  in subprocesses given ``gcs.env``. Tests keep to their own prefixes."""
  import fake_gcs  # pylint: disable=g-import-not-at-top
  with fake_gcs.serve() as server, pytest.MonkeyPatch.context() as patch:
    for name, value in server.env.items():
      patch.setenv(name, value)
    yield server


class Interrupted(Exception):
  """Stops a run the way a crash would (see :func:`run_until`)."""


def run_until(monkeypatch, run, stop_after):
  """Calls ``run()``, crashing it right after it writes a metrics record for
  which ``stop_after(record)`` is true (the record is written first)."""
  from selfish_jax.training import metrics
  real_write = metrics.MetricWriter.write

  def dying_write(self, record):
    real_write(self, record)
    if stop_after(record):
      raise Interrupted()

  monkeypatch.setattr(metrics.MetricWriter, 'write', dying_write)
  try:
    with pytest.raises(Interrupted):
      run()
  finally:
    monkeypatch.setattr(metrics.MetricWriter, 'write', real_write)


def make_tiny_config(data_dir, dataset='ptb'):
  """A small LSTM on real PTB (or ``dataset='text'``: a generated corpus in
  ``data_dir``): a few windows per epoch, fast on CPU."""
  from experiments.configs import ptb_lstm_small
  config = ptb_lstm_small.get_config()
  config.update(dataset=dataset, data_dir=data_dir, download=False, emsize=16, nhid=16, batch_size=4,
                eval_batch_size=64, bptt=5, lr=5.0, dropout=0.1, num_epochs=3,
                max_steps_per_epoch=12, log_every=4, death_rate=0.5)
  return config


@pytest.fixture
def tiny_config(text_corpus_dir):
  """The tiny LSTM on the generated corpus: runs in any checkout, no data needed."""
  return make_tiny_config(text_corpus_dir, dataset='text')
