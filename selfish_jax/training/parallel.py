"""Data parallelism on a ``jax.sharding.Mesh`` with one ``data`` axis.

The batch (and the LSTM carry) is split over the devices of the mesh; params,
masks and optimizer state are replicated, so XLA inserts the gradient
all-reduce and every device applies the same update and topology change. The
same code runs on one device, on N local devices and across hosts (each
process feeds only its addressable shards).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from selfish_jax.errors import ConfigError

DATA_AXIS = 'data'
PyTree = Any


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ``data`` mesh over the first ``num_devices`` devices (0 = all).

  A multi-process run uses every device of every process (each process feeds
  its own devices' rows): ``num_devices`` must then be 0 or the global count.
  ``jax.make_mesh`` orders the devices for the interconnect (TPU slices).
  """
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ConfigError(f'num_devices={num_devices} but {len(devices)} device(s) are available')
  if jax.process_count() > 1 and num_devices not in (0, len(devices)):
    raise ConfigError(f'num_devices={num_devices}, but a run of {jax.process_count()} processes '
                      f'uses all {len(devices)} devices: leave num_devices at 0')
  chosen = devices[:num_devices] if num_devices else devices
  return jax.make_mesh((len(chosen),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=chosen)


def check_batch_divisible(mesh: Mesh, **batch_sizes: int) -> None:
  """Every batch size must split evenly over the mesh."""
  n = mesh.devices.size
  for name, size in batch_sizes.items():
    if size % n:
      raise ConfigError(f'{name}={size} is not divisible by the {n} devices of the mesh '
                        '(set num_devices or the batch size)')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Splits axis ``batch_axis`` over the ``data`` axis."""
  return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))


def train_state_sharding(mesh: Mesh, state: PyTree) -> PyTree:
  """Shardings of a train state: everything replicated but the recurrent carry,
  which is split over the batch like the data."""
  replicated_, batch = replicated(mesh), batch_sharding(mesh)
  return jax.tree.map(lambda _: replicated_, state).replace(
      carry=jax.tree.map(lambda _: batch, state.carry))


def put(tree: PyTree, sharding: NamedSharding) -> PyTree:
  """Global arrays from host values present on every process (multi-host safe)."""

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree)
