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
from selfish_jax import host

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to an experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Multi-host run (TPU pod slice, GPU cluster): call '
    'jax.distributed.initialize(), which reads the coordinator, process count and id from the '
    'environment on TPU/SLURM, or from the three flags below.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  host.tune_for_backend()  # on CPU: XLA:CPU re-allocates its buffers every step
  from selfish_jax.training.train import train_and_evaluate  # after flags: faster --help
  if _DISTRIBUTED.value:
    cli.run_distributed(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))
  else:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main, _CONFIG)
