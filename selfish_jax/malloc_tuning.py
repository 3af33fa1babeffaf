"""glibc malloc settings of the training process that its speed depends on."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def retain_freed_memory(threshold_bytes: int = (1 << 31) - 1) -> bool:
  """Keeps glibc's malloc from handing large freed blocks back to the kernel.

  XLA:CPU allocates an executable's temporary buffers and fresh outputs on
  every call. glibc serves blocks above its mmap threshold (128 KiB, adapting
  up to 32 MiB) with ``mmap`` and unmaps them when freed, and blocks too large
  for a thread's arena (64 MiB heaps) are always mmapped, so every train step
  page-faulted its large buffers in again, zero-filled by the kernel. This
  raises the mmap and trim thresholds and keeps all threads on the main arena,
  so freed blocks stay in the heap for reuse (the page faults and step times
  it saved are in RESULTS.md, Speed); the cost is that the process keeps its
  peak memory.

  Call it once at start-up, before the first large allocation. Returns whether
  it took effect (``False`` where the C library is not glibc).
  """
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c')).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return (mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
          and mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1
          and mallopt(_M_ARENA_MAX, 1) == 1)


def tune_for_backend() -> bool:
  """The host settings of the backend the arrays will live on: on CPU,
  :func:`retain_freed_memory` (the step's buffers are host memory); on GPU and
  TPU hosts nothing (the step's buffers live on the device, and one malloc
  arena would only serialise the host's input threads). Decided without
  starting a backend (``JAX_PLATFORMS``, else whether any accelerator plugin
  or libtpu is installed), so call it first thing. Returns whether anything
  was changed."""
  return _cpu_backend() and retain_freed_memory()


def _cpu_backend() -> bool:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return (not importlib.metadata.entry_points(group='jax_plugins')
          and importlib.util.find_spec('libtpu') is None)
