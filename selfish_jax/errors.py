"""User-facing errors.

Every problem a user can fix (bad config value, missing or corrupt data file)
raises a subclass of :class:`UserError`; the command-line shell prints its
message on one line and exits non-zero instead of showing a traceback.
"""


class UserError(Exception):
  """A problem with the user's input, reported without a traceback."""


class ConfigError(UserError, ValueError):
  """An invalid configuration value or an unknown configuration key."""


class DataError(UserError, OSError):
  """A missing, unreadable or corrupt data file, or a failed download."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be written (a bucket that does not exist, no permission)."""


class TrainingDiverged(UserError, FloatingPointError):
  """The loss became NaN or inf; nothing from that point on was saved."""


class Preempted(Exception):
  """The job was asked to stop: SIGTERM (a TPU maintenance event, SLURM's
  ``scancel``, a Kubernetes eviction; exit status 143) or Ctrl-C (130). Its
  state was saved at a training step and running the same command again
  resumes from there."""

  def __init__(self, message: str, exit_status: int = 143):
    super().__init__(message)
    self.exit_status = exit_status  # 128 + the signal, what schedulers and shells expect
