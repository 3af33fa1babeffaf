r"""Why ``sparsity/select.py`` exists: exact selection at the paper's 2x1500 sizes.

  python -m benchmarks.selection

Times one Selfish-RNN topology update of the six 2x1500 weight matrices
(embedding and decoder 15M entries, LSTM kernels 9M; density 0.33, death
rate 0.5) with the counting search of ``select.py`` and with the simplest exact
alternative, two stable argsorts per matrix (removal by magnitude, random
regrowth), and prints the medians as JSON.
"""

import json
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from selfish_jax import malloc_tuning
from selfish_jax.sparsity import select, topology

_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed updates per implementation.')
SHAPES = {'embedding': (10000, 1500), 'decoder_kernel': (1500, 10000),
          'lstm_0_input': (1500, 6000), 'lstm_0_recurrent': (1500, 6000),
          'lstm_1_input': (1500, 6000), 'lstm_1_recurrent': (1500, 6000)}


def update_leaf_by_argsort(weights, mask, key, death_rate):
  """``topology.update_leaf`` (random growth) written with stable argsorts."""
  flat_w, flat_m = weights.ravel(), mask.ravel()
  count = topology.num_to_remove(jnp.sum(flat_m, dtype=jnp.int32), death_rate)

  def first(keys, k):  # the k smallest keys, ties by position
    order = jnp.argsort(keys, stable=True)
    return jnp.zeros(keys.shape, bool).at[order].set(jnp.arange(keys.size) < k)

  survivors = flat_m & ~first(jnp.where(flat_m, jnp.abs(flat_w), jnp.inf), count)
  grown = first(jnp.where(survivors, jnp.uint32(0xFFFFFFFF),
                          select.random_keys(key, flat_w.shape)), count)
  new_mask = survivors | grown
  return topology.keep_weights(flat_w, flat_m, new_mask).reshape(weights.shape), \
      new_mask.reshape(mask.shape)


def time_update(update_leaf, params, masks) -> float:
  def update(params, masks, key):
    keys = dict(zip(params, jax.random.split(key, len(params))))
    return {n: update_leaf(params[n], masks[n], keys[n], 0.5) for n in params}

  update = jax.jit(update)
  jax.block_until_ready(update(params, masks, jax.random.key(0)))
  durations = []
  for i in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(update(params, masks, jax.random.key(i + 1)))
    durations.append(time.perf_counter() - start)
  return float(np.median(durations))


def main(argv):
  del argv
  malloc_tuning.tune_for_backend()
  rng = np.random.default_rng(0)
  masks = {n: jnp.asarray(rng.random(s) < 0.33) for n, s in SHAPES.items()}
  params = {n: jnp.where(masks[n], jnp.asarray(rng.uniform(-0.1, 0.1, s), jnp.float32), 0.0)
            for n, s in SHAPES.items()}
  print(json.dumps({'counting_search_s': time_update(topology.update_leaf, params, masks),
                    'stable_argsort_s': time_update(update_leaf_by_argsort, params, masks),
                    'device': str(jax.devices()[0])}, indent=1))


if __name__ == '__main__':
  app.run(main)
