"""Data parallelism through the CLI: 1 and 4 (host-platform) devices give the same run.

With ``gradient_groups`` the gradient is summed in the same order whatever the
device count, and each group draws its own dropout, so the runs agree to float
rounding (often bitwise; XLA may still compile the per-group program a little
differently for the two layouts). The runs cover dropout, topology updates and
the SNT-ASGD switch.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import XLA_TEST_FLAGS
from selfish_jax.training import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite's compiler options (they change LLVM's work, not the HLO that the
# cost and all-gather checks read), and host devices.
ENV = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
       'XLA_FLAGS': f'{XLA_TEST_FLAGS} --xla_force_host_platform_device_count=4'}


def _cli(workdir, data_dir, *overrides):
  return [sys.executable, '-m', 'experiments.main',
          '--config=experiments/configs/ptb_lstm_small.py', f'--workdir={workdir}',
          '--config.dataset=text', f'--config.data_dir={data_dir}', '--config.download=False',
          '--config.emsize=16',
          '--config.nhid=16', '--config.batch_size=8', '--config.eval_batch_size=8',
          '--config.bptt=5', '--config.lr=5', '--config.num_epochs=3', '--config.max_steps_per_epoch=6',
          '--config.log_every=2', '--config.gradient_groups=4', '--config.asgd_start_epoch=3',
          *overrides]


def test_device_counts_give_the_same_run_through_the_cli(text_corpus_dir, tmp_path):
  runs = {}
  for n in (1, 4):
    done = subprocess.run(_cli(tmp_path / str(n), text_corpus_dir, f'--config.num_devices={n}'),
                          cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs[n] = {kind: metrics.read_records(str(tmp_path / str(n)), kind)
               for kind in metrics.KINDS}
  one = runs[1]
  epochs = one['epoch']
  assert [r['optimizer'] for r in epochs] == ['sgd', 'sgd', 'asgd']
  assert all(d > 0 for d in epochs[0]['topology_distance'].values())  # moved after epoch 1
  assert len(epochs[0]['topology_distance']) == 6  # every masked matrix
  for n in (4,):
    other = runs[n]
    np.testing.assert_allclose([r['loss'] for r in other['train']],
                               [r['loss'] for r in one['train']], rtol=1e-5)
    np.testing.assert_allclose([r['val_loss'] for r in other['epoch']],
                               [r['val_loss'] for r in epochs], rtol=1e-5)
    assert [r['topology_distance'] for r in other['epoch']] == [
        r['topology_distance'] for r in epochs]
    assert other['final'][0]['test_ppl'] == pytest.approx(one['final'][0]['test_ppl'], rel=1e-4)
    assert other['final'][0]['density'] == one['final'][0]['density']


def test_batch_not_divisible_by_the_devices_is_refused(text_corpus_dir, tmp_path):
  done = subprocess.run(_cli(tmp_path, text_corpus_dir, '--config.num_devices=4', '--config.batch_size=6',
                             '--config.gradient_groups=0'),
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      'error: batch_size=6 is not divisible by the 4 devices of the mesh (set num_devices or the '
      'batch size)')


# Compiles every family's train step on 1 and 2 host devices (small sizes) and
# prints {model: {devices: costs}} as JSON.
_COSTS_SCRIPT = """
import json, sys
import jax
from benchmarks import step as bench
from experiments.configs import ptb_lstm_small, ptb_rhn_cpu, ptb_onlstm_cpu, wt2_awd_lstm_mos_cpu
from selfish_jax import models
from selfish_jax.training import language_model_steps as steps
from selfish_jax.training import setup
import jax.numpy as jnp
out = {}
for module in (ptb_lstm_small, ptb_rhn_cpu, ptb_onlstm_cpu, wt2_awd_lstm_mos_cpu):
  config = module.get_config()
  config.update(emsize=40, nhid=40, batch_size=8, bptt=10, loss_chunk_rows=int(sys.argv[1]))
  model = models.build_model(config, 500)
  core = setup.build_core(config, 100, model.gate_layout, jax.random.key(0))
  params_key, mask_key = jax.random.split(jax.random.key(0))
  state = core.init_state(models.init_params(model, params_key), mask_key,
                          model.initial_carry(config.batch_size))
  length = config.bptt + (config.max_bptt_delta if config.variable_bptt else 0)
  tokens = jax.random.randint(jax.random.key(1), (8, length), 0, 500)
  window = steps.Windows(tokens, tokens, jnp.ones((8, length)))
  for n in (1, 2):
    config.num_devices = n
    compiled, _, _ = bench._compile_train_step(config, model, core, state, window)
    out.setdefault(config.model, {})[n] = bench.compiled_step_costs(compiled)
print(json.dumps(out))
"""


def test_data_parallel_step_divides_the_work_of_every_family():
  """On 2 devices each computes about half of one device's step, and no
  activation is gathered: the batch stays split from the input projection
  to the loss (the default fused, chunked one), and only gradients are
  all-reduced. (The plain-autodiff loss, loss_chunk_rows=0, measured the same
  way: README, Devices and scale.)"""
  done = subprocess.run([sys.executable, '-c', _COSTS_SCRIPT, '40'], cwd=ROOT,
                        env={**ENV, 'XLA_FLAGS': f'{XLA_TEST_FLAGS} '
                                                  '--xla_force_host_platform_device_count=2'},
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  costs = json.loads(done.stdout.strip().splitlines()[-1])
  assert sorted(costs) == ['awd_lstm_mos', 'lstm', 'onlstm', 'rhn']
  for model, by_devices in costs.items():
    one, two = by_devices['1'], by_devices['2']
    assert one['all_gathers'] == 0 and two['all_gathers'] == 0, (model, by_devices)
    # Half, plus the replicated optimizer update and topology bookkeeping.
    assert 0.45 < two['gflop_per_device'] / one['gflop_per_device'] < 0.6, (model, by_devices)


@pytest.mark.parametrize('precision', ['highest', 'default'])
def test_the_train_step_is_traced_under_the_configured_matmul_precision(
    precision, text_corpus_dir, tmp_path, monkeypatch):
  import jax
  from conftest import make_tiny_config
  from selfish_jax.training import language_model_steps as steps
  from selfish_jax.training.language_modelling import train_and_evaluate
  seen = []
  real_make_grad_fn = steps.make_grad_fn

  def recording_make_grad_fn(*args, **kwargs):
    grad_fn = real_make_grad_fn(*args, **kwargs)

    def traced(*a):
      seen.append(jax.config.jax_default_matmul_precision)  # at trace time
      return grad_fn(*a)

    return traced

  monkeypatch.setattr(steps, 'make_grad_fn', recording_make_grad_fn)
  config = make_tiny_config(text_corpus_dir, dataset='text')
  config.update(num_epochs=1, max_steps_per_epoch=2, eval_batch_size=16,
                matmul_precision=precision)
  train_and_evaluate(config, str(tmp_path))
  assert seen and set(seen) == {precision}
