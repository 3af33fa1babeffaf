r"""Every paper config on the accelerator at hand: compiles, trains, and what it costs.

  python -m benchmarks.paper_configs [--steps=200] [--dtypes=float32,bfloat16]
      [--configs=ptb_lstm_large,ptb_rhn,ptb_onlstm,wt2_awd_lstm_mos] [--lstm_unrolls=1,5,35]
      [--small]

For each config and compute dtype: the train step compiled as the training
loop compiles it (data parallel over every local device), ``--steps`` timed
steps on one random window (after warm-up), and one JSON line: compile time,
step time, tokens/s, per-device peak memory (where the backend reports it),
per-device GFLOP of the compiled step, and the loss of the first and last
timed step (it must fall: the step trains). A table follows the lines. At the
paper sizes the four configs in two dtypes fit in about 10 minutes on one
GPU. ``--lstm_unrolls`` times the LSTM families (``ptb_lstm_large``,
``wt2_awd_lstm_mos``) at each unroll of their recurrences' loops: what
unrolling buys in step time against what it costs in compile time (on the
CPU, 1 wins both). ``--small`` shrinks every config to a few dozen units so the script runs
on a CPU in seconds (what its test does).
"""

import json

from absl import app, flags

from benchmarks import step as step_benchmark
from experiments.configs import ptb_lstm_large, ptb_onlstm, ptb_rhn, wt2_awd_lstm_mos
from selfish_jax import malloc_tuning, models

CONFIGS = {'ptb_lstm_large': ptb_lstm_large, 'ptb_rhn': ptb_rhn, 'ptb_onlstm': ptb_onlstm,
           'wt2_awd_lstm_mos': wt2_awd_lstm_mos}
_CONFIGS = flags.DEFINE_list('configs', list(CONFIGS), 'Paper configs to run.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
_UNROLLS = flags.DEFINE_list('lstm_unrolls', ['1'],
                             'lstm_unroll values to time for the families that read it.')
_SMALL = flags.DEFINE_bool('small', False, 'Shrink every config (a CPU check of the script).')
SMALL = dict(emsize=40, nhid=40, batch_size=4, bptt=10, max_bptt_delta=5, eval_batch_size=4)
SMALL_PER_MODEL = {'rhn': dict(rhn_depth=3), 'awd_lstm_mos': dict(nhid_last=40, n_experts=2)}


def config_for(name: str, dtype: str, small: bool, lstm_unroll: int = 1):
  config = CONFIGS[name].get_config()
  config.compute_dtype = dtype
  if 'lstm_unroll' in models.FAMILIES[config.model].keys:
    config.lstm_unroll = lstm_unroll
  if small:
    config.update(**SMALL, **SMALL_PER_MODEL.get(config.model, {}))
  return config


def main(argv):
  del argv
  unknown = set(_CONFIGS.value) - set(CONFIGS)
  if unknown:
    raise app.UsageError(f'unknown --configs {sorted(unknown)}; expected some of {list(CONFIGS)}')
  malloc_tuning.tune_for_backend()
  rows = []
  unrolls = [int(u) for u in _UNROLLS.value]
  for name in _CONFIGS.value:
    reads_unroll = 'lstm_unroll' in models.FAMILIES[CONFIGS[name].get_config().model].keys
    for dtype, unroll in [(d, u) for d in _DTYPES.value for u in (unrolls if reads_unroll
                                                                  else [None])]:
      config = config_for(name, dtype, _SMALL.value, unroll or 1)
      with step_benchmark.jax.default_matmul_precision(config.matmul_precision):
        result = step_benchmark.benchmark(config, parts=('train',))
      row = {'config': name, 'compute_dtype': dtype, 'lstm_unroll': unroll,
             'params': result['params'],
             'device': result['device'], 'devices': result['devices'],
             **{k: result[k] for k in ('compile_s', 'step_ms_p50', 'tokens_per_s',
                                       'peak_memory_gb_per_device', 'gflop_per_device',
                                       'loss_first_timed_step', 'loss_last_timed_step')}}
      print(json.dumps(row), flush=True)
      rows.append(row)
  print('| config | dtype | lstm_unroll | params | compile s | step ms | tokens/s | '
        'peak GiB/device | loss first -> last |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    memory = r['peak_memory_gb_per_device']
    print(f"| {r['config']} | {r['compute_dtype']} | {r['lstm_unroll'] or '-'} | {r['params']:,} | {r['compile_s']:.1f} | "
          f"{r['step_ms_p50']:.1f} | {r['tokens_per_s']:,.0f} | "
          f"{'-' if memory is None else f'{memory:.2f}'} | "
          f"{r['loss_first_timed_step']:.3f} -> {r['loss_last_timed_step']:.3f} |")


if __name__ == '__main__':
  app.run(main)
