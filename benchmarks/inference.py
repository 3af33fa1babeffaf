r"""Batch-1 generation from an export, sparse against dense, and the file sizes.

  python -m benchmarks.inference [--run=WORKDIR] [--hidden=200,650,1500]
      [--densities=0.33,0.1,0.05] [--families] [--tokens=40]

Prints one JSON line per case: the parameters' dense float32 bytes, the
export's bytes with float32 and with bfloat16 values, and greedy generation
tokens/s, back to back in one process, of: the dense Flax model jitted on the
device (``generation.sample``, what ``experiments.generate --workdir`` runs),
the export's batch-1 engine with every matrix dense (numba's dense product, as
fast as BLAS's ``sgemv`` here; BLAS's without numba), and the same engine with
each matrix a bitmap, compressed rows or dense as measured when it loads
(``experiments.generate --export``); the two engines alternately, best of three.
``speedup`` is the last over the second (what sparsity buys), with the engine's
choice for every matrix. Stacked LSTMs of each ``--hidden`` (``2 x H``, PTB's
vocabulary) with random weights at each density; ``--run`` adds that trained
run; ``--families`` one CPU-sized model of every other family.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from selfish_jax import config as config_lib
from selfish_jax import generation, malloc_tuning, models, sparsity
from selfish_jax.inference import engines, export
from selfish_jax.training import workdir as workdir_lib

_RUN = flags.DEFINE_string('run', None, 'A trained run to export and time too.')
_HIDDEN = flags.DEFINE_list('hidden', ['200', '650', '1500'], 'Stacked LSTM sizes (2 layers).')
_DENSITIES = flags.DEFINE_list('densities', ['0.33', '0.1', '0.05'], 'Densities of the masks.')
_FAMILIES = flags.DEFINE_bool('families', True, 'Also one CPU-sized model of every other family.')
_TOKENS = flags.DEFINE_integer('tokens', 40, 'Tokens generated per timing.')

VOCAB = 10_000
FAMILY_CONFIGS = {'rhn': 'ptb_rhn_cpu', 'onlstm': 'ptb_onlstm_cpu',
                  'awd_lstm_mos': 'wt2_awd_lstm_mos_cpu'}


def _timed_generation(generate, tokens: int) -> float:
  generate()  # compiles, fills caches
  start = time.perf_counter()
  generate()
  return tokens / (time.perf_counter() - start)


def measure(config, params, masks, vocab, label: str) -> dict:
  """One case: sizes and dense/sparse generation speed of ``params`` (masked by ``masks``)."""
  model = models.build_model(config, len(vocab))
  masked = export.masked_paths(masks)
  with tempfile.TemporaryDirectory() as folder:
    sizes = {}
    for dtype in export.VALUE_DTYPES:
      path = os.path.join(folder, f'{dtype}.npz')
      header = export.write_export(path, jax.device_get(params), masked,
                                   workdir_lib.as_saved(config), list(vocab), dtype)
      sizes[dtype] = os.path.getsize(path)
    loaded = export.load_export(os.path.join(folder, 'float32.npz'))
  dense_bytes = export.dense_bytes(header)
  prompt, n = jnp.asarray([1, 2, 3]), _TOKENS.value
  dense = _timed_generation(lambda: jax.block_until_ready(generation.sample(
      model, params, prompt, jax.random.key(0), num_tokens=n, temperature=0.0)), n)
  result = {'case': label, 'model': config.model, 'density': sparsity.summarize(masks)['density'],
            'dense_bytes': dense_bytes, 'export_float32_bytes': sizes['float32'],
            'export_bfloat16_bytes': sizes['bfloat16'],
            'float32_ratio': sizes['float32'] / dense_bytes,
            'bfloat16_ratio': sizes['bfloat16'] / dense_bytes,
            'dense_tokens_per_s': dense}
  if loaded.family in engines.ENGINES:
    dense_engine = engines.engine_for(loaded, 'dense')
    engine = engines.engine_for(loaded, 'auto')
    # Alternating, best of three each: this CPU drifts by 15-30 % within minutes.
    engine_dense, sparse = 0.0, 0.0
    for _ in range(3):
      engine_dense = max(engine_dense, _timed_generation(
          lambda: dense_engine.generate([1, 2, 3], n, temperature=0.0), n))
      sparse = max(sparse, _timed_generation(
          lambda: engine.generate([1, 2, 3], n, temperature=0.0), n))
    result.update(engine_dense_tokens_per_s=engine_dense, sparse_tokens_per_s=sparse,
                  speedup=sparse / engine_dense, speedup_over_generate=sparse / dense,
                  kernels={name: [m.kernel, round(m.density, 4)]
                           for name, m in engine.matrices.items()})
  else:
    result.update(engine_dense_tokens_per_s=None, sparse_tokens_per_s=None, speedup=None,
                  speedup_over_generate=None, kernels=f'no batch-1 engine for {loaded.family}')
  return result


def _random_case(config, density: float, seed: int = 0):
  model = models.build_model(config, VOCAB)
  params = models.init_params(model, jax.random.key(seed))
  masks = sparsity.init_masks(jax.random.key(seed + 1), params, density)
  return sparsity.apply_masks(params, masks), masks, [f'w{i}' for i in range(VOCAB)]


def main(argv):
  del argv
  malloc_tuning.tune_for_backend()
  if _RUN.value:
    run = export.load_trained_run(_RUN.value)
    masks = export.unflatten_tree([
        (path, (np.asarray(value) != 0) if path in run.masked else None)
        for path, value in export.flatten_tree(run.params)])
    print(json.dumps(measure(run.config, run.params, masks, run.corpus.vocab,
                             f'run {_RUN.value}')), flush=True)
  for hidden in map(int, _HIDDEN.value):
    config = config_lib.default_config()
    config.update(emsize=hidden, nhid=hidden)
    for density in map(float, _DENSITIES.value):
      print(json.dumps(measure(config, *_random_case(config, density),
                               f'2x{hidden} lstm at {density}')), flush=True)
  if _FAMILIES.value:
    import importlib  # pylint: disable=g-import-not-at-top
    for family, name in FAMILY_CONFIGS.items():
      config = importlib.import_module(f'experiments.configs.{name}').get_config()
      print(json.dumps(measure(config, *_random_case(config, config.density),
                               f'{name} at {config.density}')), flush=True)


if __name__ == '__main__':
  app.run(main)
