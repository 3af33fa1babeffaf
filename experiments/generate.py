r"""Generates text from a trained run's best weights, or from an export of them.

  python -m experiments.generate --workdir=/tmp/run --prompt="the company said" \
      [--num_tokens=50] [--temperature=1.0] [--seed=0]
  python -m experiments.generate --export=/tmp/run.npz --prompt="the company said"

With ``--workdir`` the run's ``config.json`` says which model and corpus; the
corpus is loaded (from its ``data_dir``, downloaded if allowed) for the
vocabulary, and the dense model samples on the device. With ``--export`` the
file holds both, and a batch-1 engine samples on the CPU with sparse products
wherever they are faster (``selfish_jax.inference``). Prompt words outside the
vocabulary become ``<unk>``. Prints the prompt and its continuation; ``<eos>``
is printed as a line break.
"""

from absl import flags

from experiments import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run\'s workdir.')
_EXPORT = flags.DEFINE_string('export', None, 'An export of a run (experiments.export).')
_PROMPT = flags.DEFINE_string('prompt', '', 'Words to continue (empty: start a sentence).')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 50, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 is greedy.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  del argv
  from selfish_jax.data.corpus import EOS, encode
  from selfish_jax.errors import ConfigError

  if (_WORKDIR.value is None) == (_EXPORT.value is None):
    raise ConfigError('give one of --workdir (a run) and --export (an export file)')
  if _NUM_TOKENS.value < 1 or _TEMPERATURE.value < 0:
    raise ConfigError('--num_tokens must be >= 1 and --temperature >= 0')
  words = _PROMPT.value.split() or [EOS]
  if _EXPORT.value is not None:
    from selfish_jax.inference import engines, export
    exported = export.load_export(_EXPORT.value)
    vocab = exported.vocab
    engine = engines.engine_for(exported)
    tokens = engine.generate(encode(words, vocab, 'the prompt'), _NUM_TOKENS.value,
                             _TEMPERATURE.value, _SEED.value)
  else:
    import jax
    import jax.numpy as jnp
    from selfish_jax import generation
    from selfish_jax.inference.export import load_trained_run
    run = load_trained_run(_WORKDIR.value)
    vocab = run.corpus.vocab
    prompt = jnp.asarray(encode(words, vocab, 'the prompt'))
    tokens = generation.sample(run.model, run.params, prompt, jax.random.key(_SEED.value),
                               num_tokens=_NUM_TOKENS.value, temperature=_TEMPERATURE.value)
  text = ' '.join(vocab[int(t)] for t in tokens)
  print(' '.join(_PROMPT.value.split()), text.replace(f' {EOS} ', '\n').replace(EOS, '\n'))


if __name__ == '__main__':
  cli.run(main, None)
