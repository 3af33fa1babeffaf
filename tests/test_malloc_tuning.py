"""malloc_tuning.retain_freed_memory: large freed blocks stay in the heap for reuse."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, touches and frees a 64 MiB block; prints glibc's mmapped bytes while
# it was live and the free bytes kept in the heap after it was freed.
SCRIPT = textwrap.dedent('''
    import ctypes, sys
    from selfish_jax import malloc_tuning
    if sys.argv[1] == 'retain':
      assert malloc_tuning.retain_freed_memory()
    class Mallinfo2(ctypes.Structure):
      _fields_ = [(name, ctypes.c_size_t) for name in (
          'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
          'fordblks', 'keepcost')]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    mmapped_while_live = libc.mallinfo2().hblkhd
    libc.free(block)
    print(mmapped_while_live, libc.mallinfo2().fordblks)
''')


def _run(mode):
  result = subprocess.run([sys.executable, '-c', SCRIPT, mode], cwd=ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, 'PYTHONPATH': ROOT})
  return [int(x) for x in result.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc only')
def test_large_freed_blocks_stay_in_the_heap_only_when_retained():
  size = 64 << 20
  mmapped, kept_free = _run('default')
  assert mmapped >= size and kept_free < size  # glibc's default: mmapped, then unmapped
  mmapped, kept_free = _run('retain')
  assert mmapped < size and kept_free >= size  # from the heap, and kept there once freed
