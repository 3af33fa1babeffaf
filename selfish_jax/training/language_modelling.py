"""``train_and_evaluate``: language modelling with Selfish-RNN and SNT-ASGD.

The task's own parts: the corpus cut into BPTT windows (variable BPTT drawn per
epoch from the seed), the model, its gradient (the core applies it as a
sparse step), the step jitted over the mesh and the evaluation on the
validation and test splits. The run setup, epochs, switch, topology updates,
checkpoints and preemption are shared (:func:`selfish_jax.training.setup.run_task`);
after the last epoch the best weights are tested.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from selfish_jax import config as config_lib
from selfish_jax import flops, models, sparsity
from selfish_jax.data import Corpus, batchify, batching, load_corpus
from selfish_jax.errors import DataError
from selfish_jax.training import language_model_steps as lm_steps
from selfish_jax.training import parallel
from selfish_jax.training.core import TrainStep
from selfish_jax.training.loop import Run, Start, perplexity
from selfish_jax.training.setup import run_task
from selfish_jax.training.state import TrainState

PyTree = Any


@dataclasses.dataclass
class _EpochWindows:
  """One epoch's training windows, put on the devices one at a time."""
  windows: batching.Windows
  lr_factors: np.ndarray
  num_steps: int
  sharding: jax.sharding.Sharding

  def __post_init__(self):
    self._tokens = self.windows.weights.sum(axis=(1, 2)).astype(int)  # real tokens a window

  def __len__(self) -> int:
    return self.num_steps

  def __getitem__(self, index: int) -> tuple[batching.Windows, np.float32]:
    return parallel.put(self.windows[index], self.sharding), self.lr_factors[index]

  def tokens(self, index: int) -> int:
    return int(self._tokens[index])


def _columns(corpus: Corpus, split: str, key: str, batch_size: int,
             config: ml_collections.ConfigDict) -> np.ndarray:
  """``batchify`` of a split, or a DataError naming the corpus whose split is too
  short for the batch (every column needs an input and a target)."""
  tokens = corpus.split(split)
  if len(tokens) < 2 * batch_size:
    raise DataError(f'the {split} split of the {config.dataset} corpus in {config.data_dir} has '
                    f'{len(tokens)} tokens: too few for {key}={batch_size} (it needs at least '
                    f'{2 * batch_size})')
  return batchify(tokens, batch_size)


def jit_train_step(train_step: TrainStep, mesh: jax.sharding.Mesh,
                   state_sharding: PyTree) -> Callable:
  """``train_step`` (the core's sparse step of a language model's gradient)
  jitted data parallel over ``mesh``: the state donated and kept in
  ``state_sharding``, the window split by rows. What training and
  ``benchmarks.step`` run."""
  batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_sharding, batch, replicated, replicated),
                 out_shardings=(state_sharding, replicated))


class LanguageModelling:
  """The language-modelling task of ``config`` on one mesh: what the run setup
  and :class:`Run` train (:class:`~selfish_jax.training.setup.RunTask`)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    corpus = load_corpus(config.dataset, config.data_dir, allow_download=config.download,
                         base_url=config.download_url or None)
    columns = lambda split, key, batch_size: _columns(corpus, split, key, batch_size, config)
    self._train_columns = columns('train', 'batch_size', config.batch_size)
    self._fixed_windows = batching.make_windows(self._train_columns, config.bptt)
    # Nominal: variable BPTT draws a few more (shorter) windows an epoch. The
    # method's schedules run over num_epochs x this many steps.
    self.steps_per_epoch = self._limit(self._fixed_windows.num_windows)
    parallel.check_batch_divisible(mesh, batch_size=config.batch_size,
                                   eval_batch_size=config.eval_batch_size,
                                   gradient_groups=config.gradient_groups)
    self.mesh = mesh
    self.replicated = parallel.replicated(mesh)
    self.batch_sharded = parallel.batch_sharding(mesh)
    by_rows = parallel.batch_sharding(mesh, batch_axis=1)
    self.valid_windows = parallel.put(batching.make_windows(
        columns('valid', 'eval_batch_size', config.eval_batch_size), config.bptt), by_rows)
    self.test_batch_size = config.test_batch_size or config.eval_batch_size
    # A test batch the devices do not divide (the official scripts' batch 1) is
    # evaluated whole on every device.
    self.test_windows = parallel.put(batching.make_windows(
        columns('test', 'test_batch_size', self.test_batch_size), config.bptt),
        by_rows if self.test_batch_size % mesh.devices.size == 0 else self.replicated)
    self.model = models.build_model(config, corpus.vocab_size, mesh.devices.size)
    self.description = (f'{config.model} language model on {config.dataset} '
                        f'({config.nlayers} layers of {config.nhid}), optimizer {config.optimizer}')
    self.gate_layout = self.model.gate_layout
    self.grad_fn = lm_steps.make_grad_fn(self.model, mesh, config.gradient_groups)

  def init_params(self, key: jax.Array) -> PyTree:
    return models.init_params(self.model, key)

  def initial_carry(self) -> PyTree:
    return self.model.initial_carry(self.config.batch_size)

  def place(self, state: TrainState) -> TrainState:
    """The state on the mesh: replicated params, the carry split by rows."""
    self.state_sharding = parallel.train_state_sharding(self.mesh, state)
    return jax.device_put(state, self.state_sharding)

  def compile(self, train_step: TrainStep, dropout_key: jax.Array) -> None:
    """Jits the train step and the evaluations (after :meth:`place`)."""
    step = jit_train_step(train_step, self.mesh, self.state_sharding)
    self._train_step = lambda state, batch: step(state, batch[0], dropout_key, batch[1])
    self._evaluate = jax.jit(lm_steps.make_evaluate(self.model, self.config.eval_batch_size))
    self._evaluate_test = (
        self._evaluate if self.test_batch_size == self.config.eval_batch_size
        else jax.jit(lm_steps.make_evaluate(self.model, self.test_batch_size)))

  def _limit(self, num_windows: int) -> int:
    if self.config.max_steps_per_epoch:
      return min(num_windows, self.config.max_steps_per_epoch)
    return num_windows

  # The Task protocol.

  def epoch_batches(self, epoch: int) -> _EpochWindows:
    """The epoch's windows and per-window lr factors (drawn from the seed and the
    epoch under variable BPTT, so a resumed epoch gets the same)."""
    config = self.config
    if config.variable_bptt:
      windows, factors = batching.make_variable_windows(
          self._train_columns, config.bptt, config.max_bptt_delta,
          np.random.default_rng([config.seed, epoch]))
    else:
      windows = self._fixed_windows
      factors = np.ones(windows.num_windows, np.float32)
    return _EpochWindows(windows, factors, self._limit(windows.num_windows), self.batch_sharded)

  def begin_epoch(self, state: TrainState) -> TrainState:
    return state.replace(carry=parallel.put(self.model.initial_carry(self.config.batch_size),
                                            self.batch_sharded))

  def train_step(self, state, batch):
    return self._train_step(state, batch)

  def evaluate(self, weights: PyTree) -> tuple[float, dict]:
    loss = float(self._evaluate(weights, self.valid_windows))
    return loss, {'val_loss': loss, 'val_ppl': perplexity(loss)}

  def summary(self, fields: dict) -> str:
    return f'valid loss {fields["val_loss"]:5.2f} | valid ppl {fields["val_ppl"]:8.2f}'

  def test(self, weights: PyTree) -> float:
    return float(self._evaluate_test(weights, self.test_windows))

  def final_record(self, run: Run) -> dict:
    """The best weights' test loss, the best validation loss, the parameters and
    the training FLOPs relative to dense."""
    test_loss = self.test(run.best_weights())
    state, uses = run.state, self.model.weight_uses
    dense_forward = flops.forward_flops_per_token(state.params,
                                                  sparsity.dense_masks(state.params), uses)
    sparse_forward = flops.forward_flops_per_token(state.params, state.masks, uses)
    best_val_loss = run.loop.best_val_loss
    logging.info('| end of training | test loss %5.2f | test ppl %8.2f | best valid ppl %8.2f',
                 test_loss, perplexity(test_loss), perplexity(best_val_loss))
    return {'test_loss': test_loss, 'test_ppl': perplexity(test_loss),
            'best_val_loss': best_val_loss, 'best_val_ppl': perplexity(best_val_loss),
            **run.core.size_fields(state),
            'train_flops_relative': flops.train_flops_relative(
                run.core.method, sparse_forward, dense_forward,
                self.config.num_epochs * self.steps_per_epoch)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       start: Start | None = None) -> dict:
  """Trains, validates and tests as ``config`` says; resumes from ``workdir``.

  Every program is traced under ``config.matmul_precision``. ``start`` gives a
  new run another starting point (see :class:`~selfish_jax.training.loop.Start`).

  Returns:
    The final record: best validation and test perplexity, and more.

  Raises:
    Preempted: SIGTERM or Ctrl-C arrived; the state of the step it was noticed
      at is saved.
  """
  config_lib.validate(config)
  with jax.default_matmul_precision(config.matmul_precision):
    return run_task(config, workdir, lambda: LanguageModelling(
        config, parallel.make_mesh(config.num_devices)), start)
