import platform

import pytest

from selfish_jax import host


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc only')
def test_retain_freed_memory_takes_effect_on_glibc():
  assert host.retain_freed_memory() is True
