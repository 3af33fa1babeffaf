"""Each sweep cell's log lines in its own ``train.log``, the terminal showing the sweep."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import tempfile

from absl import logging as absl_logging
from etils import epath
import jax

from selfish_jax import storage


class _TrainingInfo(std_logging.Filter):
  """Holds back the INFO lines of the training code (a cell's progress and epochs)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or (
        os.sep + os.path.join('selfish_jax', 'training') + os.sep) not in record.pathname


@contextlib.contextmanager
def cell_log(path: str, show: bool):
  """Within: every log line goes to ``path/train.log`` too (process 0's), and
  unless ``show`` the terminal leaves out the training code's INFO lines.

  An object store cannot append: there the lines go to a local file, added
  to ``train.log`` when the block ends (a process killed meanwhile loses them).
  """
  to_file, uploaded_to = std_logging.NullHandler(), None
  if jax.process_index() == 0:
    log_path = os.path.join(path, 'train.log')
    if storage.is_object_store(path):
      with tempfile.NamedTemporaryFile('w', suffix='.log', delete=False) as local:
        uploaded_to, log_path = log_path, local.name
    else:
      os.makedirs(path, exist_ok=True)
    to_file = std_logging.FileHandler(log_path)
    to_file.setFormatter(absl_logging.PythonFormatter())
  absl_logging.get_absl_logger().addHandler(to_file)
  terminal, held_back = absl_logging.get_absl_handler(), _TrainingInfo()
  if not show:
    terminal.addFilter(held_back)
  try:
    yield
  finally:
    terminal.removeFilter(held_back)
    absl_logging.get_absl_logger().removeHandler(to_file)
    to_file.close()
    if uploaded_to is not None:
      target = epath.Path(uploaded_to)
      with open(log_path) as f:
        lines = f.read()
      os.remove(log_path)
      storage.write_atomically(
          target, (target.read_text() if target.exists() else '') + lines)
