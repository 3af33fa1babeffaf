r"""Generates text from a trained run's best weights.

  python -m experiments.generate --workdir=/tmp/run --prompt="the company said" \
      [--num_tokens=50] [--temperature=1.0] [--seed=0]

The run's ``config.json`` says which model and corpus; the corpus is loaded
(from its ``data_dir``, downloaded if allowed) for the vocabulary. Prompt words
outside it become ``<unk>``. Prints the prompt and its continuation; ``<eos>``
is printed as a line break.
"""

from absl import flags
import jax
import jax.numpy as jnp

from experiments import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run\'s workdir.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Words to continue (empty: start a sentence).')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 50, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 is greedy.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  from selfish_jax import config as config_lib
  from selfish_jax import generation, models
  from selfish_jax.data import load_corpus
  from selfish_jax.data.corpus import EOS, encode
  from selfish_jax.errors import ConfigError
  from selfish_jax.training.checkpoint import Checkpoints
  from selfish_jax.training.workdir import read_config

  saved = read_config(_WORKDIR.value)
  if saved is None:
    raise ConfigError(f'no training run in {_WORKDIR.value} (it has no config.json)')
  if _NUM_TOKENS.value < 1 or _TEMPERATURE.value < 0:
    raise ConfigError('--num_tokens must be >= 1 and --temperature >= 0')
  config = config_lib.default_config()
  config.update(saved)
  config_lib.validate(config)
  corpus = load_corpus(config.dataset, config.data_dir, allow_download=config.download,
                       base_url=config.download_url or None)
  model = models.build_model(config, corpus.vocab_size)
  checkpoints = Checkpoints(_WORKDIR.value)
  params = checkpoints.restore_best(models.init_params(model, jax.random.key(0)))
  checkpoints.close()
  if params is None:
    raise ConfigError(f'{_WORKDIR.value} has no best weights yet (no epoch finished)')
  words = _PROMPT.value.split() or [EOS]
  prompt = jnp.asarray(encode(words, corpus.vocab, 'the prompt'))
  tokens = generation.sample(model, params, prompt, jax.random.key(_SEED.value),
                             num_tokens=_NUM_TOKENS.value, temperature=_TEMPERATURE.value)
  text = ' '.join(corpus.vocab[int(t)] for t in tokens)
  print(' '.join(_PROMPT.value.split()), text.replace(f' {EOS} ', '\n').replace(EOS, '\n'))


if __name__ == '__main__':
  cli.run(main, None)
