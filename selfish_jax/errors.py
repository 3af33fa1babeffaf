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
  """The job was asked to stop (SIGTERM: a TPU maintenance event, SLURM's
  ``scancel``, a Kubernetes eviction); its state was saved at a training step
  and running the same command again resumes from there."""

  exit_status = 143  # 128 + SIGTERM, what schedulers expect of a terminated job
