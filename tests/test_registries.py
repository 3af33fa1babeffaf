"""A new method and a new optimizer are one registry entry each, made outside
the package: config, the sweep's cells and the FLOPs count take them like the
others."""

import jax
import optax
import pytest

from experiments import sweep
from selfish_jax import config as config_lib
from selfish_jax import optim, sparsity
from selfish_jax.errors import ConfigError
from selfish_jax.sparsity import methods
from selfish_jax.training import metrics
from selfish_jax.training.language_modelling import train_and_evaluate


def _steady(settings: methods.MethodSettings) -> methods.Method:
  """Selfish-RNN's update at a constant rate of 0.1, with a FLOPs rule of its own."""

  def update(params, masks, state, key, step, scores=None):
    del step, scores
    return (*sparsity.update_topology(params, masks, key, 0.1), state)

  return methods.Method(name='steady', **settings.common, update=update,
                        removal_rate=optax.constant_schedule(0.1),
                        flops=lambda method, sparse, dense, steps: 0.5)


def test_a_method_and_an_optimizer_registered_outside_the_package(monkeypatch, tiny_config,
                                                                  tmp_path):
  monkeypatch.setitem(methods.METHODS, 'steady', _steady)
  monkeypatch.setitem(optim.OPTIMIZERS, 'lion', optim.OptimizerEntry(
      lambda lr, **unused: optim.sparsify(optax.lion(lr)), first_moment=True, sweep_lr=1e-4))
  tiny_config.update(method='steady', optimizer='lion', lr=1e-3, num_epochs=2,
                     max_steps_per_epoch=6)
  config_lib.validate(tiny_config)
  final = train_and_evaluate(tiny_config, str(tmp_path))
  epochs = metrics.read_records(str(tmp_path), metrics.EPOCH)
  assert [r['death_rate'] for r in epochs] == [pytest.approx(0.1)] * 2  # its schedule, logged
  assert all(r['topology_distance'] for r in epochs)  # its update ran at both epoch ends
  assert final['density'] == pytest.approx(0.33, abs=1e-3)
  assert final['train_flops_relative'] == 0.5  # its FLOPs rule
  # Lion keeps a first moment (optax's 'mu'): SNFS grows by it, and a sweep keeps it.
  tiny_config.update(method='snfs')
  config_lib.validate(tiny_config)
  cell = sweep.cell_config(tiny_config, 'snfs', 'lion', 1, {'lion': 1e-4})
  assert (cell.optimizer, cell.lr) == ('lion', 1e-4)
  params = {'w': jax.numpy.ones((4, 4))}
  tx = optim.make_optimizer('lion', 1e-3)
  _, state = tx.update(params, tx.init(params), params, masks={'w': None})
  assert jax.tree.structure(optim.first_moment(state)) == jax.tree.structure(params)
  # Without the entries they are unknown again.
  monkeypatch.delitem(methods.METHODS, 'steady')
  with pytest.raises(ConfigError, match="unknown method 'steady'"):
    config_lib.validate(_with(tiny_config, method='steady'))


def _with(config, **values):
  config = config.copy_and_resolve_references()
  config.update(**values)
  return config
