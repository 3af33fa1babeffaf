r"""Trains a sparse LSTM text classifier.

  python -m experiments.classify --config=experiments/configs/bbc_news_lstm.py \
      --workdir=/tmp/bbc --config.method=selfish --config.density=0.2

Running again with the same ``--workdir`` resumes from its last finished epoch.
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli
from selfish_jax import malloc_tuning

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a classification config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  malloc_tuning.tune_for_backend()
  from selfish_jax.training.classification import train_classifier
  final = train_classifier(_CONFIG.value, _WORKDIR.value)
  print(f"best held-out accuracy {final['best_accuracy']:.4f}, final "
        f"{final['final_accuracy']:.4f}, density {final['density']:.4f}")


if __name__ == '__main__':
  cli.run(main, _CONFIG)
