"""``train_and_evaluate``: language modelling with Selfish-RNN and SNT-ASGD.

The task's own parts: the corpus cut into BPTT windows (variable BPTT drawn per
epoch from the seed), the model, the sharded train step and the evaluation on
the validation and test splits. The epochs (switch, topology updates, best
weights, checkpoints, resume, preemption) are the shared
:class:`~selfish_jax.training.loop.Run`; after the last epoch the best weights
are tested.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from selfish_jax import config as config_lib
from selfish_jax import flops, models, sparsity
from selfish_jax.data import Corpus, batchify, batching, load_corpus
from selfish_jax.errors import DataError
from selfish_jax.training import parallel, steps
from selfish_jax.training.core import SparseTraining
from selfish_jax.training.loop import Run, Start, perplexity
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


def initial_state(core: SparseTraining, model: models.LanguageModel, batch_size: int,
                  init_key: jax.Array) -> TrainState:
  """A language model's fresh state: its initial params masked by the core, a zero carry."""
  params_key, mask_key = jax.random.split(init_key)
  return core.init_state(models.init_params(model, params_key), mask_key,
                         model.initial_carry(batch_size))


class LanguageModelling:
  """The language-modelling task of ``config`` on one mesh: what :class:`Run` trains."""

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

  def _limit(self, num_windows: int) -> int:
    if self.config.max_steps_per_epoch:
      return min(num_windows, self.config.max_steps_per_epoch)
    return num_windows

  def initial_state(self, core: SparseTraining, init_key: jax.Array) -> TrainState:
    """The fresh state, placed on the mesh (replicated params, carry split by rows)."""
    state = initial_state(core, self.model, self.config.batch_size, init_key)
    self.state_sharding = parallel.train_state_sharding(self.mesh, state)
    return jax.device_put(state, self.state_sharding)

  def compile(self, tx, dropout_key: jax.Array) -> None:
    """Jits the train step and the evaluations (after :meth:`initial_state`)."""
    grad_fn = steps.make_grad_fn(self.model, self.mesh, self.config.gradient_groups)
    step = jax.jit(steps.make_train_step(grad_fn, tx), donate_argnums=0,
                   in_shardings=(self.state_sharding, self.batch_sharded, self.replicated,
                                 self.replicated),
                   out_shardings=(self.state_sharding, self.replicated))
    self._train_step = lambda state, batch: step(state, batch[0], dropout_key, batch[1])
    self._evaluate = jax.jit(steps.make_evaluate(self.model, self.config.eval_batch_size))
    self._evaluate_test = (
        self._evaluate if self.test_batch_size == self.config.eval_batch_size
        else jax.jit(steps.make_evaluate(self.model, self.test_batch_size)))

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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       start: Start | None = None) -> dict:
  """Trains, validates and tests as ``config`` says; resumes from ``workdir``.

  Every program is traced under ``config.matmul_precision``. ``start`` gives a
  new run another starting point (see :class:`~selfish_jax.training.loop.Run`).

  Returns:
    The final record: best validation and test perplexity, and more.

  Raises:
    Preempted: SIGTERM arrived; the state of the step it was noticed at is saved.
  """
  config_lib.validate(config)
  with jax.default_matmul_precision(config.matmul_precision):
    task = LanguageModelling(config, parallel.make_mesh(config.num_devices))
    # (A fourth key once drew the dropout of a separate gradient pass; the split
    # stays 4-way so the other keys, and every result, stay the same.)
    init_key, dropout_key, topology_key, _ = jax.random.split(jax.random.key(config.seed), 4)
    core = SparseTraining.from_config(config, task.steps_per_epoch, topology_key,
                                      task.model.gate_layout)
    state = task.initial_state(core, init_key)
    task.compile(core.tx, dropout_key)
    with Run(config, workdir, core, state, description=task.description, start=start) as run:
      run.train(task)
      test_loss = task.test(run.best_weights())
      state = run.state
      dense_forward = flops.forward_flops_per_token(
          state.params, sparsity.dense_masks(state.params), task.model.weight_uses)
      sparse_forward = flops.forward_flops_per_token(state.params, state.masks,
                                                     task.model.weight_uses)
      final = run.finish({
          'test_loss': test_loss, 'test_ppl': perplexity(test_loss),
          'best_val_loss': run.host.best_val_loss,
          'best_val_ppl': perplexity(run.host.best_val_loss),
          'density': sparsity.summarize(state.masks)['density'],
          'params': sparsity.host_numbers(sparsity.parameter_count(state.params, state.masks)),
          'train_flops_relative': flops.train_flops_relative(
              core.method, sparse_forward, dense_forward,
              config.num_epochs * task.steps_per_epoch)})
    logging.info('| end of training | test loss %5.2f | test ppl %8.2f | best valid ppl %8.2f',
                 test_loss, final['test_ppl'], final['best_val_ppl'])
    return final
