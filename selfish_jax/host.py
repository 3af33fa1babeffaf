"""Settings of the host process that training speed depends on."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
  """Keeps glibc's malloc from handing large freed blocks back to the kernel.

  XLA:CPU allocates an executable's temporary buffers and fresh outputs on
  every call. glibc serves blocks above its mmap threshold (128 KiB, adapting
  up to 32 MiB) with ``mmap`` and unmaps them when freed, so every train step
  page-faults all its large buffers in again, zero-filled by the kernel: on a
  2-core CPU that was a fifth of the 2x200 LSTM's step (77 -> 60 ms p50).
  Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse;
  the cost is that the process keeps its peak memory.

  Call it once at start-up, before the first large allocation. Returns whether
  it took effect (``False`` where the C library is not glibc).
  """
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c')).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return (mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
          and mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1)
