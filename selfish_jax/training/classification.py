"""``train_classifier``: sparse LSTM text classification with the same methods and
optimizers as the language models (the journal paper's second task).

The task's own parts: documents in shuffled batches (a permutation drawn from
the seed and the epoch), the classifier, its cross-entropy step, and loss and
accuracy on the held-out split. The epochs (the trigger on the held-out loss,
topology updates, checkpoints, resume, preemption) are the shared
:class:`~selfish_jax.training.loop.Run`, as for language models.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from selfish_jax import config as config_lib
from selfish_jax.checks import check_choice, check_finite_numbers, check_fractions, check_int
from selfish_jax.data import documents as documents_lib
from selfish_jax.errors import ConfigError
from selfish_jax.models.classifier import LSTMClassifier
from selfish_jax.training import metrics
from selfish_jax.training.core import TrainStep
from selfish_jax.training.loop import Run
from selfish_jax.training.setup import run_task
from selfish_jax.training.state import TrainState


POOLINGS = ('mean', 'last')


def classification_config() -> ml_collections.ConfigDict:
  """Every key of a classification run with its default (BBC News, 1x128 LSTM)."""
  c = ml_collections.ConfigDict()
  c.corpus = 'bbc_news'  # bbc_news | ag_news | imdb
  c.data_dir = '~/.cache/selfish_jax'  # holds ag_news/ and imdb/ (bbc_news: the package)
  c.held_out_fraction = 0.2  # bbc_news: per class, drawn from the seed
  c.max_len = 200  # words per document (its first ones)
  c.vocab_size = 20_000  # most frequent training words, <pad> and <unk> included
  c.emsize = 128
  c.nhid = 128
  c.nlayers = 1
  c.dropout = 0.3
  c.pooling = 'mean'  # mean | last: the top layer's states over the real words, or the last
  c.seed = 1
  c.batch_size = 32
  c.eval_batch_size = 256
  c.num_epochs = 10
  c.log_every = 50  # steps between progress lines
  c.checkpoint_every_steps = 0  # 0 = at the end of each epoch only
  config_lib.add_optimizer_keys(c)
  # SGD with the language models' clip of 0.25 stayed at chance for 3 epochs on
  # BBC News at lr 1, 2 and 10; Adam learns in 3-5 epochs.
  c.optimizer = 'adam'
  c.lr = 2e-3
  config_lib.add_sparsity_keys(c)
  c.density = 0.2
  c.death_rate = 0.5
  c.lock()
  return c


def validate_classification(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises :class:`ConfigError` naming the first bad or unknown value."""
  config_lib.check_known_keys(config, classification_config())
  check_finite_numbers(config)
  check_choice(config, 'corpus', documents_lib.DOCUMENT_CORPORA)
  config_lib.validate_sparse_training(config)
  check_choice(config, 'pooling', POOLINGS)
  if not 0.0 < config.held_out_fraction < 1.0:
    raise ConfigError(f'held_out_fraction must be in (0, 1), got {config.held_out_fraction!r}')
  check_fractions(config, ('dropout',))
  for key in ('max_len', 'emsize', 'nhid', 'nlayers', 'batch_size', 'eval_batch_size',
              'num_epochs', 'log_every'):
    check_int(config, key)
  check_int(config, 'checkpoint_every_steps', minimum=0)
  check_int(config, 'vocab_size', minimum=3)
  return config


def _cross_entropy(model, params, ids, weights, labels, train_mode, key=None):
  rngs = {'dropout': key} if train_mode else {}
  logits = model.apply({'params': params}, ids, weights, train=train_mode, rngs=rngs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits


@dataclasses.dataclass
class _ShuffledBatches:
  """One epoch's batches of whole documents, in the epoch's permutation."""
  ids: np.ndarray
  weights: np.ndarray
  labels: np.ndarray
  order: np.ndarray
  batch_size: int

  def __len__(self) -> int:
    return len(self.labels) // self.batch_size

  def _rows(self, index: int) -> np.ndarray:
    return self.order[index * self.batch_size:(index + 1) * self.batch_size]

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = self._rows(index)
    return self.ids[rows], self.weights[rows], self.labels[rows]

  def tokens(self, index: int) -> int:
    return int(self.weights[self._rows(index)].sum())


class Classification:
  """The document-classification task of ``config``: what :class:`Run` trains."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    splits = documents_lib.load_documents(config.corpus, config.data_dir,
                                          config.held_out_fraction, config.seed)
    vocab = documents_lib.build_vocab(splits['train'], config.vocab_size)
    self.train_ids, self.train_weights = documents_lib.encode(splits['train'], vocab,
                                                              config.max_len)
    self.test_ids, self.test_weights = documents_lib.encode(splits['test'], vocab,
                                                            config.max_len)
    self.train_labels, self.test_labels = splits['train'].labels, splits['test'].labels
    self.steps_per_epoch = len(self.train_labels) // config.batch_size
    if self.steps_per_epoch < 1:
      raise ConfigError(f'{len(self.train_labels)} training documents are fewer than one batch '
                        f'of {config.batch_size}')
    self.model = LSTMClassifier(len(vocab), len(splits['train'].classes), config.emsize,
                                config.nhid, config.nlayers, config.dropout, config.pooling)
    self.description = (f'{config.nlayers}x{config.nhid} LSTM classifier on {config.corpus} '
                        f'({len(splits["train"].classes)} classes), optimizer {config.optimizer}')
    self.gate_layout = self.model.gate_layout

  def init_params(self, key: jax.Array):
    return jax.jit(lambda k: self.model.init(
        k, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)), train=False)['params'])(key)

  def grad_fn(self, params, carry, batch, key):
    """The mean cross-entropy of a batch of documents and its gradient (no carry)."""
    ids, weights, labels = batch
    mean = lambda p: jnp.mean(_cross_entropy(self.model, p, ids, weights, labels, True, key)[0])
    loss, grads = jax.value_and_grad(mean)(params)
    return loss, carry, grads

  def initial_carry(self):
    return ()

  def place(self, state: TrainState) -> TrainState:
    return state

  def compile(self, train_step: TrainStep, dropout_key: jax.Array) -> None:
    model = self.model
    step = jax.jit(train_step)
    self._train_step = lambda state, batch: step(state, batch, dropout_key)

    @jax.jit
    def evaluate_batch(params, ids, weights, labels):
      nll, logits = _cross_entropy(model, params, ids, weights, labels, False)
      return jnp.sum(nll), jnp.sum(jnp.argmax(logits, -1) == labels)

    self._evaluate_batch = evaluate_batch

  # The Task protocol.

  def epoch_batches(self, epoch: int) -> _ShuffledBatches:
    order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.train_labels))
    return _ShuffledBatches(self.train_ids, self.train_weights, self.train_labels, order,
                            self.config.batch_size)

  def begin_epoch(self, state: TrainState) -> TrainState:
    return state

  def train_step(self, state, batch):
    return self._train_step(state, batch)

  def evaluate(self, weights) -> tuple[float, dict]:
    total_nll, correct = 0.0, 0
    for start in range(0, len(self.test_labels), self.config.eval_batch_size):
      part = slice(start, start + self.config.eval_batch_size)
      nll, right = self._evaluate_batch(weights, self.test_ids[part], self.test_weights[part],
                                        self.test_labels[part])
      total_nll, correct = total_nll + float(nll), correct + int(right)
    loss, accuracy = total_nll / len(self.test_labels), correct / len(self.test_labels)
    return loss, {'held_out_loss': loss, 'held_out_accuracy': accuracy}

  def summary(self, fields: dict) -> str:
    return (f'held-out loss {fields["held_out_loss"]:.4f} | accuracy '
            f'{fields["held_out_accuracy"]:.4f}')


  def final_record(self, run: Run) -> dict:
    """The best and the final held-out accuracy, the density and the parameters."""
    accuracies = [r['held_out_accuracy']
                  for r in metrics.read_records(run.workdir, metrics.EPOCH)]
    final = {'best_accuracy': max(accuracies, default=0.0),
             'final_accuracy': accuracies[-1] if accuracies else None,
             **run.core.size_fields(run.state)}
    logging.info('| end of training | best held-out accuracy %.4f | final %.4f',
                 final['best_accuracy'], final['final_accuracy'])
    return final


def train_classifier(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates as ``config`` says; resumes from ``workdir``.

  Returns:
    The final record: best and final held-out accuracy, density, parameters.
  """
  validate_classification(config)
  return run_task(config, workdir, lambda: Classification(config))
