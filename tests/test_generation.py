"""Sampling from a trained model: the core function and the command line."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfish_jax import config as config_lib
from selfish_jax import generation, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('family', ['lstm', 'rhn'])
def test_greedy_sampling_feeds_back_the_most_likely_token(family):
  config = config_lib.default_config()
  config.update(model=family, emsize=8, nhid=8, nlayers=1 if family == 'rhn' else 2,
                rhn_depth=2)
  model = models.build_model(config, 30)
  params = models.init_params(model, jax.random.key(0))
  params = jax.tree.map(lambda p: 20 * p, params)  # sharper logits: clear argmaxes
  prompt = jnp.array([3, 5], jnp.int32)
  tokens = generation.sample(model, params, prompt, jax.random.key(1), num_tokens=4,
                             temperature=0.0)
  # The same by hand: the prompt, then one token at a time from the carried state.
  logits, carry = models.logits(model, params, prompt[None], model.initial_carry(1))
  expected = []
  for _ in range(4):
    token = int(jnp.argmax(logits[0, -1]))
    expected.append(token)
    logits, carry = models.logits(model, params, jnp.array([[token]]), carry)
  assert tokens.tolist() == expected
  drawn = generation.sample(model, params, prompt, jax.random.key(1), num_tokens=50,
                            temperature=1.0)
  again = generation.sample(model, params, prompt, jax.random.key(1), num_tokens=50,
                            temperature=1.0)
  np.testing.assert_array_equal(drawn, again)  # the seed decides
  assert len(set(drawn.tolist())) > 1 and 0 <= int(drawn.min()) and int(drawn.max()) < 30


def test_generate_cli_continues_a_prompt_from_a_finished_run(text_corpus_dir, tmp_path):
  from conftest import make_tiny_config
  from selfish_jax.training.language_modelling import train_and_evaluate
  config = make_tiny_config(text_corpus_dir, dataset='text')
  config.update(num_epochs=1, max_steps_per_epoch=4)
  train_and_evaluate(config, str(tmp_path))
  command = [sys.executable, '-m', 'experiments.generate', f'--workdir={tmp_path}',
             '--prompt=w1 w2 zzzunknownword', '--num_tokens=12', '--temperature=0']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('w1 w2 zzzunknownword ')  # unknown words: <unk>
  generated = result.stdout[len('w1 w2 zzzunknownword '):]
  # Every token is a word or, for <eos>, a line break (print adds the last one).
  assert len(generated.split()) + generated.count('\n') - 1 == 12
  # Exported, the run generates the same greedy continuation on the sparse batch-1 engine.
  exported = subprocess.run([sys.executable, '-m', 'experiments.export', f'--workdir={tmp_path}',
                             f'--out={tmp_path / "model.npz"}'], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
  assert exported.returncode == 0, exported.stderr[-2000:]
  assert exported.stdout.startswith(f'{tmp_path / "model.npz"}: ') and 'of the dense' in (
      exported.stdout)
  sparse = subprocess.run([*command[:3], f'--export={tmp_path / "model.npz"}', *command[4:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert sparse.returncode == 0, sparse.stderr[-2000:]
  assert sparse.stdout == result.stdout
  missing = subprocess.run([sys.executable, '-m', 'experiments.generate',
                            f'--workdir={tmp_path / "nothing"}'], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines() == [
      f'error: no training run in {tmp_path / "nothing"} (it has no config.json)']
