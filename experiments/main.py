r"""Trains a sparse RNN language model.

  python -m experiments.main --config=experiments/configs/ptb_lstm_small.py \
      --workdir=/tmp/run --config.data_dir=../shared/data --config.method=dense

Running again with the same ``--workdir`` resumes from its last checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from selfish_jax.errors import UserError
from selfish_jax.training.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to an experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_handler().use_absl_log_file = False
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
