r"""Exports a run's best weights to one file, only the active entries of each masked matrix.

  python -m experiments.export --workdir=/tmp/run --out=/tmp/run.npz [--dtype=bfloat16]

The file (format: ``selfish_jax/inference/export.py``) holds the model config
and vocabulary too, so ``experiments.generate --export=FILE`` and
``selfish_jax.inference.load_export`` read it without the run. Prints the
parameters' dense float32 size and the file's.
"""

from absl import flags

from experiments import cli

_WORKDIR = flags.DEFINE_string('workdir', None, "A training run's workdir.")
_OUT = flags.DEFINE_string('out', None, 'The file to write (a local path or gs://...).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'The stored values: float32 (exact) or bfloat16 (half the bytes).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  from selfish_jax.inference.export import export_run  # after flags: faster --help
  header = export_run(_WORKDIR.value, _OUT.value, _DTYPE.value)
  sparse = [leaf for leaf in header['leaves'] if leaf['storage'] != 'dense']
  print(f'{_OUT.value}: {header["bytes"]:,} bytes ({header["bytes"] / header["dense_bytes"]:.3f} of '
        f'the dense {header["dense_bytes"]:,}); {len(sparse)} sparse matrices, '
        f'{sum(leaf["count"] for leaf in sparse):,} weights stored, values {_DTYPE.value}')


if __name__ == '__main__':
  cli.run(main, None)
