"""The one error path of the command-line programs.

A problem the user can fix (an unknown flag or config key, a bad value, a
missing or corrupt data file, a diverged run) is printed as one line
``error: ...`` on stderr and the program exits with status 1, no traceback.
A preempted run (SIGTERM) saves its state, prints one line ``preempted: ...``
and exits with status 143; Ctrl-C does the same with ``interrupted: ...`` and
status 130 (a second Ctrl-C, or one outside training, stops at once, keeping
what was saved).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import Callable, NoReturn

from absl import app, flags
from absl import logging as absl_logging

from selfish_jax.errors import Preempted, UserError


_LIBRARY_LOGS = flags.DEFINE_bool(
    'library_logs', False, "Also show other libraries' INFO lines (orbax's checkpointing, JAX's "
    'backend discovery); their warnings and errors always show. absl --verbosity=1 shows all.')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache_dir', None, "JAX's persistent compilation cache: a second run, a resume "
    'or the next sweep cell of the same shapes reuses the compiled programs. Default: '
    '$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/selfish_jax/jax_cache '
    '(XDG_CACHE_HOME defaults to ~/.cache); an empty value turns it off.')
_OWN_CODE = tuple(os.sep + name + os.sep for name in ('selfish_jax', 'experiments', 'benchmarks'))


class OwnInfoOnly(logging.Filter):
  """Passes warnings and errors, and INFO lines from this project's own code:
  a run's terminal shows the run, not orbax's bookkeeping."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or any(
        part in record.pathname for part in _OWN_CODE)


def quiet_library_info() -> None:
  """Installs :class:`OwnInfoOnly` on absl's handler unless ``--library_logs`` or a
  ``--verbosity`` above INFO asks for everything."""
  if _LIBRARY_LOGS.value or absl_logging.get_verbosity() > absl_logging.INFO:
    return
  absl_logging.get_absl_handler().addFilter(OwnInfoOnly())


def compilation_cache_dir() -> str:
  """Where compiled programs are kept ('' when off), from the flag or the environment."""
  if _COMPILATION_CACHE.value is not None:
    return os.path.expanduser(_COMPILATION_CACHE.value)
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache_home, 'selfish_jax', 'jax_cache')


def use_compilation_cache() -> None:
  """Turns JAX's persistent compilation cache on at :func:`compilation_cache_dir`."""
  directory = compilation_cache_dir()
  if directory:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', directory)


def _print_error(message: object) -> None:
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)


def fail(message: object) -> NoReturn:
  _print_error(message)
  sys.exit(1)


def fail_now(message: object) -> NoReturn:
  """:func:`fail` without the interpreter's exit handlers: after another process
  of a multi-process run died, JAX's shutdown barrier would wait out that
  process's heartbeat timeout and then abort with pages of logs."""
  _print_error(message)
  sys.stdout.flush()
  os._exit(1)


def run_distributed(train: Callable[[], object]) -> None:
  """Runs ``train()`` in a multi-process run, where a process that fails must
  end at once: the others then fail in their next collective instead of
  waiting in it, and leave with one line too. A failed collective (another
  process died or was killed) is reported as such; a user error as itself;
  anything else with its traceback."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    train()
  except UserError as e:
    fail_now(e)
  except Exception as e:  # pylint: disable=broad-except
    # orbax re-raises a peer's failure as a ValueError, or as its own barrier's TimeoutError.
    peer_failure = next((cause for cause in _causes(e)
                         if isinstance(cause, jax.errors.JaxRuntimeError)
                         or any(marker in str(cause) for marker in _TRANSPORT_FAILURES)), None)
    if peer_failure is not None:
      text = str(peer_failure).strip()
      first = text.splitlines()[0] if text else type(peer_failure).__name__
      fail_now(f'process {jax.process_index()} of {jax.process_count()} stops: a collective '
               f'with the other processes failed ({first}); the checkpoints in the workdir are '
               'kept, start every process again to resume')
    traceback.print_exc()
    fail_now(f'process {jax.process_index()} of {jax.process_count()} failed (traceback above)')


def _causes(error: BaseException) -> list[BaseException]:
  """``error``, then the exceptions it was raised from or while handling."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


# What the collectives' transports say when a peer process has gone.
_TRANSPORT_FAILURES = ('Gloo', 'NCCL', 'Connection reset by peer', 'Connection closed by peer',
                       'heartbeat timeout')


def _flags_parser(config_flag: flags.FlagHolder | None) -> Callable[[list[str]], list[str]]:
  """absl flag parsing with one-line errors (unknown config keys, bad config files)."""

  def parse(argv: list[str]) -> list[str]:
    try:
      args = flags.FLAGS(argv)
      if config_flag is not None:
        config_flag.value.keys()  # a config file that failed to load raises here
      return args
    except flags.Error as e:
      fail(e)
    except (AttributeError, KeyError) as e:
      text = str(e).replace('\\n', ' ')
      key = re.search(r"'([^'\\]+)\\?'", text)
      hint = re.search(r'Did you mean "([^"]+)"', text)
      fail(f'unknown config key {key.group(1) if key else text!r}'
           + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))
    except (OSError, ValueError, TypeError) as e:
      fail(e)

  return parse


class DistributedFlags:
  """The multi-process flags of a program that trains (``--distributed`` and
  the coordinator's address, process count and id); define them once at import."""

  def __init__(self):
    self.enabled = flags.DEFINE_bool(
        'distributed', False, 'Multi-host run (TPU pod slice, GPU cluster): call '
        'jax.distributed.initialize(), which reads the coordinator, process count and id from '
        'the environment on TPU/SLURM, or from the three flags below. Start the same command on '
        'every host, with a workdir they all share.')
    self.coordinator = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
    self.num_processes = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
    self.process_id = flags.DEFINE_integer('process_id', None, "This process's index.")
    self.heartbeat_timeout = flags.DEFINE_integer(
        'heartbeat_timeout', 100, 'Seconds without a heartbeat after which the processes take one '
        'of them for dead (JAX\'s default, 100). A process that dies while the others wait for it '
        'outside a collective (in a checkpoint\'s barrier) is noticed only then.')

  def run(self, train: Callable[[], object]) -> None:
    """Starts the multi-process runtime if asked, tunes malloc for the backend,
    and runs ``train()`` (as :func:`run_distributed` does when distributed)."""
    from selfish_jax import malloc_tuning  # pylint: disable=g-import-not-at-top
    malloc_tuning.tune_for_backend()  # on CPU: XLA:CPU re-allocates its buffers every step
    if not self.enabled.value:
      train()
      return
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(coordinator_address=self.coordinator.value,
                               num_processes=self.num_processes.value,
                               process_id=self.process_id.value,
                               heartbeat_timeout_seconds=self.heartbeat_timeout.value)
    run_distributed(train)


def run(main: Callable[[list[str]], None], config_flag: flags.FlagHolder | None, *,
        positional_args: bool = False) -> None:
  """``app.run(main)`` with one-line errors for bad flags and for every :class:`UserError`;
  arguments other than flags are an error unless ``positional_args``."""

  def guarded(argv: list[str]) -> None:
    quiet_library_info()
    use_compilation_cache()
    if len(argv) > 1 and not positional_args:
      fail(f'unexpected arguments: {" ".join(argv[1:])}')
    try:
      main(argv)
    except UserError as e:
      fail(e)
    except Preempted as e:  # the state is saved: one line, the scheduler's exit status
      print(' '.join(str(e).split()), file=sys.stderr)
      sys.exit(e.exit_status)
    except KeyboardInterrupt:  # Ctrl-C outside training, or twice
      print('interrupted: stopped at once; the checkpoints already in the workdir are kept, '
            'and the same command resumes from the latest', file=sys.stderr)
      sys.exit(130)

  app.run(guarded, flags_parser=_flags_parser(config_flag))
