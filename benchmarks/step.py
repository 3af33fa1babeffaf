r"""Speed of one configuration: train step, evaluation and topology update.

  python -m benchmarks.step --config=experiments/configs/ptb_lstm_small.py [--config.KEY=VALUE]
      [--parts=train,eval,topology]

Prints one JSON object: compile time, train-step time percentiles and tokens/s
(after warm-up, >= 50 timed steps), evaluation tokens/s, one topology update's
time (Selfish-RNN's, called as the training loop calls it, on the initial weights;
``topology_update_after_update_s`` on the previous update's output, whose regrown
weights are all 0), and the achieved
GFLOP/s of the train step: the weight products a step
executes, 3x the dense forward FLOPs per token (see ``selfish_jax.flops``; the
step multiplies dense matrices whatever their masks), divided by its median
time. Inputs are random tokens of the dataset's vocabulary size, so no data is
needed; seeds are fixed. ``--parts=topology`` times only the topology update
(for paper-sized models whose train step a CPU cannot time). The train step
is compiled as the training loop compiles it, data parallel over
``config.num_devices`` devices (0: all), and ``gflop_per_device`` and
``all_gathers`` report what XLA made of it (``--parts=compile`` reports only
those and ``compile_s``, without running). Like
``experiments.main`` it first keeps freed host memory for reuse
on CPU (``selfish_jax.malloc_tuning``); ``--noretain_freed_memory`` measures without that.
"""

import json
import re
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from selfish_jax import config as config_lib
from selfish_jax import flops as flops_lib
from selfish_jax import malloc_tuning, models
from selfish_jax import sparsity
from selfish_jax.data import batching
from selfish_jax.data.corpus import KNOWN_CORPORA
from selfish_jax.sparsity import methods
from selfish_jax.training import language_model_steps as lm_steps
from selfish_jax.training import language_modelling, parallel, setup

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_STEPS = flags.DEFINE_integer('steps', 60, 'Timed train steps (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed train steps after compilation.')
_TOPOLOGY_REPEATS = flags.DEFINE_integer('topology_repeats', 3, 'Timed topology updates.')
PARTS = ('train', 'eval', 'topology', 'compile')
_PARTS = flags.DEFINE_list('parts', ['train', 'eval', 'topology'],
                           'What to measure: train, eval, topology; compile (only compiles '
                           'the train step and reports its per-device GFLOP and all-gathers).')
_RETAIN_FREED_MEMORY = flags.DEFINE_bool(
    'retain_freed_memory', True, 'Keep freed host memory for reuse (selfish_jax.malloc_tuning).')


def _block(tree):
  jax.block_until_ready(tree)
  return tree


def _time_train_step(config, model, core, state, window) -> dict:
  start = time.perf_counter()
  dropout_key = jax.random.key(1)
  compiled, state, window = _compile_train_step(config, model, core, state, window)
  compile_s = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    state, _ = compiled(state, window, dropout_key, 1.0)
  _block(state)
  times, losses = [], []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, loss = compiled(state, window, dropout_key, 1.0)
    losses.append(float(loss))  # waits for the step
    times.append(time.perf_counter() - start)
  step_ms = np.array(times) * 1000
  p50 = float(np.percentile(step_ms, 50))
  memory = jax.local_devices()[0].memory_stats() or {}  # None on CPU
  dense_masks = jax.tree.map(lambda _: None, state.params)
  steps_computed = window.inputs.size  # padded steps included
  flops = 3 * steps_computed * flops_lib.forward_flops_per_token(state.params, dense_masks,
                                                                 model.weight_uses)
  return {
      'tokens_per_s': config.batch_size * config.bptt / (p50 / 1000),
      'step_ms_p10': float(np.percentile(step_ms, 10)),
      'step_ms_p50': p50,
      'step_ms_p90': float(np.percentile(step_ms, 90)),
      'compile_s': compile_s,
      'devices': len(window.inputs.sharding.device_set),
      'peak_memory_gb_per_device': (memory['peak_bytes_in_use'] / 2**30
                                    if 'peak_bytes_in_use' in memory else None),
      **compiled_step_costs(compiled),
      'step_gflop': flops / 1e9,
      'gflops_per_s': flops / 1e9 / (p50 / 1000),
      'timed_steps': len(times),
      # The same window every step: the loss must fall (a check that the step trains).
      'loss_first_timed_step': losses[0],
      'loss_last_timed_step': losses[-1],
  }


def _compile_train_step(config, model, core, state, window):
  """``(compiled step, state, window)``: the data-parallel train step that
  training runs (the core's sparse step of the language model's gradient,
  jitted by ``language_modelling.jit_train_step``), on ``config.num_devices``
  devices (0: all), with the state and window placed on them."""
  mesh = parallel.make_mesh(config.num_devices)
  state_sharding = parallel.train_state_sharding(mesh, state)
  step = language_modelling.jit_train_step(
      core.train_step(lm_steps.make_grad_fn(model, mesh, config.gradient_groups)), mesh,
      state_sharding)
  state = jax.device_put(state, state_sharding)
  window = jax.device_put(window, parallel.batch_sharding(mesh))
  return step.lower(state, window, jax.random.key(1), 1.0).compile(), state, window


def compiled_step_costs(compiled) -> dict:
  """What XLA compiled for the train step: per-device GFLOP (the compiled
  program's cost analysis) and the number of all-gathers in it. Data
  parallelism divides the work when the first falls as 1/N on N devices and
  the second stays 0 (activations stay split over the batch; only gradients
  are all-reduced). XLA's cost analysis counts a loop's body once, whatever
  its trip count (the chunked softmax loss, un-unrolled recurrences): compare
  the figure between device counts, not with the step's real FLOPs."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  return {'gflop_per_device': float(cost['flops']) / 1e9,
          'all_gathers': len(re.findall(r'= [^=]*\ball-gather(?:-start)?\(', hlo))}


def _time_evaluation(config, model, params, window) -> dict:
  eval_windows = batching.Windows(*(jnp.stack([x[:config.eval_batch_size, :config.bptt]] * 10)
                                 for x in (window.inputs, window.targets, window.weights)))
  evaluate = jax.jit(lm_steps.make_evaluate(model, eval_windows.inputs.shape[1]))
  _block(evaluate(params, eval_windows))
  start = time.perf_counter()
  _block(evaluate(params, eval_windows))
  return {'eval_tokens_per_s': eval_windows.weights.size / (time.perf_counter() - start)}


def _time_topology_update(config, params, masks) -> dict:
  # Selfish-RNN's update (magnitude removal, random regrowth) at the config's death
  # rate, jitted as the core jits a method's update (params donated).
  selfish = methods.make_method('selfish', density=config.density,
                                death_rate=config.death_rate, total_steps=1000)
  update = jax.jit(selfish.update, donate_argnums=0)
  fresh, chained = [], []
  updated, updated_masks = jax.tree.map(jnp.copy, params), masks
  for i in range(_TOPOLOGY_REPEATS.value + 1):  # the first call compiles
    # Each update of the initial weights, as training's updates meet weights an
    # epoch of SGD has moved; and each update of the last one's output, whose
    # regrown weights are still exactly 0 (their ties cost a second search).
    initial = _block(jax.tree.map(jnp.copy, params))  # donated
    start = time.perf_counter()
    _block(update(initial, masks, {}, jax.random.key(2 + i), 0))
    fresh.append(time.perf_counter() - start)
    start = time.perf_counter()
    updated, updated_masks, _ = _block(update(updated, updated_masks, {},
                                              jax.random.key(2 + i), 0))
    chained.append(time.perf_counter() - start)
  return {'topology_update_s': float(np.median(fresh[1:])),
          'topology_update_after_update_s': float(np.median(chained[1:])),
          'density_after_topology_updates': float(sparsity.overall_density(updated_masks))}


def benchmark(config, parts=PARTS) -> dict:
  """The figures of ``parts`` (a subset of :data:`PARTS`) for ``config``."""
  config_lib.validate(config)
  vocab = KNOWN_CORPORA[config.dataset].vocab_size
  rng = np.random.default_rng(0)
  # Under variable BPTT every window is padded to bptt + max_bptt_delta steps,
  # of which about bptt are real: the step runs on that padded shape, tokens/s
  # counts bptt tokens a row and GFLOP/s the padded steps it computes.
  length = config.bptt + (config.max_bptt_delta if config.variable_bptt else 0)
  shape = (config.batch_size, length)
  weights = np.zeros(shape, np.float32)
  weights[:, :config.bptt] = 1.0
  window = batching.Windows(jnp.asarray(rng.integers(0, vocab, shape), jnp.int32),
                         jnp.asarray(rng.integers(0, vocab, shape), jnp.int32),
                         jnp.asarray(weights))
  devices = parallel.make_mesh(config.num_devices).devices.size
  model = models.build_model(config, vocab, devices)
  keys = setup.RunKeys.from_seed(config.seed)
  core = setup.build_core(config, 1000, model.gate_layout, keys.topology)
  method = core.method
  state = core.init_state(models.init_params(model, keys.params), keys.masks,
                          model.initial_carry(config.batch_size))
  result = {
      'config': {k: config[k] for k in ('model', 'dataset', 'emsize', 'nhid', 'nlayers',
                                        'batch_size', 'bptt', 'variable_bptt', 'method',
                                        'density', 'compute_dtype')},
      'params': sum(int(p.size) for p in jax.tree.leaves(state.params)),
      'device': str(jax.devices()[0]),
  }
  if 'topology' in parts and method.sparse:  # first: the train step donates the state
    params, masks = jax.tree.map(jnp.copy, (state.params, state.masks))
    result.update(_time_topology_update(config, params, masks))
  if 'eval' in parts:
    result.update(_time_evaluation(config, model, state.params, window))
  if 'train' in parts:
    result.update(_time_train_step(config, model, core, state, window))
  elif 'compile' in parts:
    start = time.perf_counter()
    compiled, _, window = _compile_train_step(config, model, core, state, window)
    result.update(compile_s=time.perf_counter() - start,
                  devices=len(window.inputs.sharding.device_set),
                  **compiled_step_costs(compiled))
  return result


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError('--config is required')
  if _RETAIN_FREED_MEMORY.value:
    malloc_tuning.tune_for_backend()
  unknown = set(_PARTS.value) - set(PARTS)
  if unknown:
    raise app.UsageError(f'unknown --parts {sorted(unknown)}; expected some of {PARTS}')
  with jax.default_matmul_precision(_CONFIG.value.matmul_precision):
    print(json.dumps(benchmark(_CONFIG.value, tuple(_PARTS.value)), indent=1))


if __name__ == '__main__':
  app.run(main)
