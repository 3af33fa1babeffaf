"""The training configuration: every key, its default, and its validation.

Experiment configs (``experiments/configs/*.py``) start from
:func:`default_config` and override values; the config is locked, so a key
that does not exist is an error instead of a silent no-op.
"""

from __future__ import annotations

import ml_collections

from selfish_jax import models, optim
from selfish_jax.data import corpus
from selfish_jax.checks import (check_at_least, check_choice, check_finite_numbers,
                                check_fractions, check_int)
from selfish_jax.errors import ConfigError
from selfish_jax.sparsity import masks, methods, topology

MODELS = models.MODELS
METHODS = methods.METHODS
OPTIMIZERS = optim.OPTIMIZERS
DATASETS = (*corpus.KNOWN_CORPORA, corpus.TEXT_DIRECTORY)
SPARSE_INITS = masks.SPARSE_INITS
GROWTH_MODES = topology.GROWTH_MODES
GROWTH_TIES = topology.GROWTH_TIES
COMPUTE_DTYPES = ('float32', 'bfloat16')
MATMUL_PRECISIONS = ('highest', 'high', 'default')


def add_optimizer_keys(c: ml_collections.ConfigDict) -> None:
  """The optimizer section (SNT-ASGD and the others), shared by every task's config."""
  # snt_asgd (SGD, then sparse averaging on the trigger) | asgd (the same with dense
  # averaging, one counter: the ablation) | sgd | momentum | adam
  c.optimizer = 'snt_asgd'
  c.lr = 20.0
  c.clip = 0.25
  c.weight_decay = 1.2e-6
  c.momentum = 0.9  # for optimizer=momentum (and adam's b1)
  c.nonmono = 5
  # > 0: snt_asgd/asgd average from this epoch on, whatever the non-monotone trigger says.
  c.asgd_start_epoch = 0
  # Epochs after which averaging, if on, starts over (new averages, every counter
  # at 0), as the official ON-LSTM script's --finetuning/--finetuning2 do.
  c.asgd_restart_epochs = ()


def add_sparsity_keys(c: ml_collections.ConfigDict) -> None:
  """The sparse-training section (method, density, schedule), shared by every task's config."""
  c.method = 'selfish'
  c.density = 0.33
  c.sparse_init = 'uniform'
  c.death_rate = 0.8
  c.death_rate_final = 0.005
  c.growth = 'random'  # selfish only: random | gradient (RigL-style) | momentum (SNFS-style)
  # Growth by scores (gradient, momentum: selfish, rigl, snfs): equal scores in a random
  # order from the update's key, or 'lowest_position' first (runs before 2026-12-06).
  c.growth_ties = 'random'
  c.update_every = 100  # rigl, gmp: topology steps between updates (the others: every epoch)
  c.update_end_fraction = 0.75  # rigl, gmp: no updates after this fraction of training


def default_config() -> ml_collections.ConfigDict:
  """All configuration keys with their defaults (a small PTB LSTM)."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = 'ptb'  # ptb | wikitext2 | text (data_dir is then the corpus folder itself)
  c.data_dir = '~/.cache/selfish_jax'  # holds ptb/, wikitext-2/ (or gs://...); the download cache
  c.download = True  # fetch missing splits (sha256-checked) from their public location
  c.download_url = ''  # a mirror serving {split}.txt, instead of the standard location
  # Model: the family, then the sizes and dropouts every family reads.
  c.model = 'lstm'  # lstm | rhn | onlstm | awd_lstm_mos
  c.emsize = 200
  c.nhid = 200
  c.nlayers = 2
  c.dropout = 0.3  # lstm: everywhere (element-wise); others: locked, on the last output
  c.tied = False
  # Each family's own keys, with its defaults and their meaning, are in its
  # module's FAMILY (selfish_jax/models/{lstm,rhn,onlstm,mos}.py); a value set
  # away from its default is an error under a family that does not read it.
  for key, value in models.family_defaults().items():
    c[key] = value
  c.compute_dtype = 'float32'
  # Rows per device per chunk of the fused softmax-loss gradient (0: plain
  # autodiff). 700 is one chunk for batch 20 x bptt 35: on the CPU larger
  # matmuls outweigh the cache (RESULTS.md, Speed). MoS configs keep 128: its
  # tile is rows x experts x vocab.
  c.loss_chunk_rows = 700
  # Precision of float32 matrix products (jax.default_matmul_precision):
  # 'highest' computes them in float32 on every backend, as the reference's
  # PyTorch does; 'high' and 'default' let TPUs use 3 or 1 bfloat16 passes and
  # recent NVIDIA GPUs TF32 (faster; can move the perplexities). No effect on CPU.
  c.matmul_precision = 'highest'
  # Optimisation (SNT-ASGD).
  c.seed = 1111
  c.batch_size = 20
  c.eval_batch_size = 20
  # The test split's batch (0: eval_batch_size). The official ON-LSTM and MoS
  # scripts test with batch 1: one state carried through the whole text.
  c.test_batch_size = 0
  c.bptt = 35
  # AWD-LSTM's variable BPTT: each window is bptt (p=0.95) or bptt/2, plus
  # N(0, 5) steps, at least 5 and at most bptt + max_bptt_delta; lr scales
  # with the window's length / bptt. Windows are padded to one length.
  c.variable_bptt = False
  c.max_bptt_delta = 20
  add_optimizer_keys(c)
  c.num_epochs = 15
  c.max_steps_per_epoch = 0  # 0 = the whole training split each epoch
  add_sparsity_keys(c)
  # Devices: data parallelism over a 1-D mesh.
  c.num_devices = 0  # 0 = all devices; the batch sizes must be divisible by it
  # > 0: gradients of this many equal row groups, gathered and summed in order,
  # so results do not depend on the device count (any count dividing it).
  c.gradient_groups = 0
  # Logging and checkpoints.
  c.log_every = 200
  c.checkpoint_every_steps = 0  # 0 = at the end of each epoch only
  c.lock()  # a key that does not exist is an error, also from library code
  return c


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises :class:`ConfigError` naming the first bad or unknown value."""
  check_known_keys(config, default_config())
  check_finite_numbers(config)
  check_choice(config, 'dataset', DATASETS)
  validate_sparse_training(config)
  check_choice(config, 'compute_dtype', COMPUTE_DTYPES)
  check_choice(config, 'matmul_precision', MATMUL_PRECISIONS)
  if not (isinstance(config.loss_chunk_rows, int) and config.loss_chunk_rows >= 0):
    raise ConfigError(f'loss_chunk_rows must be an integer >= 0, got {config.loss_chunk_rows!r}')
  check_fractions(config, ('dropout',))
  for key in ('emsize', 'nhid', 'nlayers', 'batch_size', 'eval_batch_size', 'bptt',
              'num_epochs', 'log_every'):
    check_int(config, key)
  for key in ('max_bptt_delta', 'max_steps_per_epoch', 'checkpoint_every_steps',
              'num_devices', 'gradient_groups', 'test_batch_size'):
    check_int(config, key, minimum=0)
  if config.gradient_groups and config.batch_size % config.gradient_groups:
    raise ConfigError(f'batch_size={config.batch_size} is not divisible by '
                      f'gradient_groups={config.gradient_groups}')
  models.check_model_config(config)
  return config


def check_known_keys(config: ml_collections.ConfigDict,
                     defaults: ml_collections.ConfigDict) -> None:
  unknown = set(config.keys()) - set(defaults.keys())
  if unknown:
    raise ConfigError(f'unknown config key(s): {", ".join(sorted(unknown))}')


def validate_sparse_training(config: ml_collections.ConfigDict) -> None:
  """Checks the keys of :func:`add_optimizer_keys` and :func:`add_sparsity_keys`."""
  check_choice(config, 'method', METHODS)
  check_choice(config, 'sparse_init', SPARSE_INITS)
  check_choice(config, 'growth', GROWTH_MODES)
  check_choice(config, 'growth_ties', GROWTH_TIES)
  check_choice(config, 'optimizer', OPTIMIZERS)
  # make_method refuses a density outside (0, 1] (masks.validate_density).
  method = methods.make_method(config.method, density=config.density, growth=config.growth,
                               total_steps=1)
  if method.grows_by == 'momentum' and not optim.OPTIMIZERS[config.optimizer].first_moment:
    with_moment = tuple(n for n, entry in optim.OPTIMIZERS.items() if entry.first_moment)
    raise ConfigError(f'method {config.method!r} with growth from momentum needs an optimizer '
                      f'with a first moment (one of {with_moment}), not {config.optimizer!r}')
  for key in ('death_rate', 'death_rate_final'):
    if not 0.0 <= config[key] <= 1.0:
      raise ConfigError(f'{key} must be in [0, 1], got {config[key]!r}')
  if not 0.0 < config.update_end_fraction <= 1.0:
    raise ConfigError(f'update_end_fraction must be in (0, 1], got {config.update_end_fraction!r}')
  check_int(config, 'update_every')
  for key in ('nonmono', 'asgd_start_epoch'):
    check_int(config, key, minimum=0)
  restarts = config.asgd_restart_epochs
  if not (isinstance(restarts, (tuple, list)) and all(
      isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in restarts)):
    raise ConfigError(f'asgd_restart_epochs must be a tuple of epochs >= 1, got {restarts!r}')
  if not config.lr > 0:
    raise ConfigError(f'lr must be > 0, got {config.lr!r}')
  check_at_least(config, 'clip')  # 0: no clipping
  check_at_least(config, 'weight_decay')
  check_fractions(config, ('momentum',))
