r"""Trains a sparse RNN language model.

  python -m experiments.main --config=experiments/configs/ptb_lstm_small.py \
      --workdir=/tmp/run --config.data_dir=../shared/data --config.method=dense

Running again with the same ``--workdir`` resumes from its last checkpoint.
User errors (bad flag or config value, missing or corrupt data, a diverged
run) are reported on one line with a non-zero exit code (``experiments.cli``).
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to an experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_DISTRIBUTED = cli.DistributedFlags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from selfish_jax.training.language_modelling import train_and_evaluate  # after flags: faster --help
  _DISTRIBUTED.run(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == '__main__':
  cli.run(main, _CONFIG)
