"""Data parallelism: 4 host devices train like 1 device on the same global batch."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax
    from experiments.configs import ptb_lstm_small
    from selfish_jax import optim
    from selfish_jax.errors import ConfigError
    from selfish_jax.training import metrics, train
    assert jax.device_count() == 4, jax.devices()
    # The NT-ASGD switch after epoch 2, so the run covers SGD, a switch and ASGD.
    optim.nonmonotone_trigger = lambda losses, loss, nonmono: len(losses) == 1
    data_dir, workdir = sys.argv[1], sys.argv[2]
    results = {}
    for n in (1, 4):
      config = ptb_lstm_small.get_config()
      config.update(data_dir=data_dir, download=False, emsize=16, nhid=16, batch_size=8,
                    eval_batch_size=32, bptt=10, lr=5.0, num_epochs=3, max_steps_per_epoch=4,
                    log_every=1, num_devices=n, growth='gradient')
      final = train.train_and_evaluate(config, f'{workdir}/{n}')
      records = metrics.read_records(f'{workdir}/{n}/metrics.jsonl')
      results[n] = {'loss': [r['loss'] for r in records if 'loss' in r],
                    'val': [r['val_loss'] for r in records if 'val_loss' in r],
                    'optimizer': [r['optimizer'] for r in records if 'val_loss' in r],
                    'test': final['test_loss'], 'density': final['density']}
    config.batch_size = 6
    try:
      train.train_and_evaluate(config, f'{workdir}/bad')
    except ConfigError as e:
      results['error'] = str(e)
    print('RESULTS', json.dumps(results))
''')


def test_four_devices_match_one_device(shared_data_dir, tmp_path):
  env = {**os.environ, 'PYTHONPATH': ROOT,
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', SCRIPT, shared_data_dir, str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULTS ')][-1]
  results = json.loads(line[len('RESULTS '):])
  one, four = results['1'], results['4']
  assert len(one['loss']) == 12
  assert one['optimizer'] == four['optimizer'] == ['sgd', 'sgd', 'asgd']
  np.testing.assert_allclose(four['loss'], one['loss'], rtol=2e-4)
  np.testing.assert_allclose(four['val'], one['val'], rtol=2e-4)
  assert four['test'] == pytest.approx(one['test'], rel=2e-4)
  assert four['density'] == one['density']
  assert 'batch_size=6 is not divisible by the 4 devices' in results['error']
