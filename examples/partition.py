"""SNT-ASGD for the weight matrices, Adam for the biases, through ``optax.partition``.

``sparsity.sparse_labels(masks)`` labels every masked leaf ``'sparse'`` and
every other leaf ``'dense'``; the masks reach SNT-ASGD as the ``masks``
keyword, which ``optax.partition`` forwards. Averaging is switched on midway,
as the non-monotone trigger would, and the averaged weights evaluated.

  python examples/partition.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfish_jax import optim, sparsity


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(jnp.tanh(nn.Dense(64)(x)))


def main(steps: int = 400, density: float = 0.33) -> dict:
  x = jax.random.uniform(jax.random.key(0), (256, 4), minval=-2, maxval=2)
  y = jnp.sin(x[:, :1]) * x[:, 1:2]
  model = MLP()
  params = model.init(jax.random.key(1), x[:1])['params']
  masks = sparsity.init_masks(jax.random.key(2), params, density)
  params = sparsity.apply_masks(params, masks)
  tx = optax.partition({'sparse': optim.snt_asgd(0.5, clip_norm=1.0),
                        'dense': optax.adam(1e-2)}, sparsity.sparse_labels(masks))
  opt_state = tx.init(params)
  loss_fn = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)

  @jax.jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for step in range(steps):
    if step == steps // 2:
      opt_state = optim.start_averaging(opt_state)  # found inside the partition's state
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  averaged = optim.averaged_params(opt_state, params, masks)
  print(f'loss {losses[0]:.4f} -> {losses[-1]:.4f}; averaged weights {float(loss_fn(averaged)):.4f}')
  return {'losses': losses, 'params': params, 'averaged': averaged, 'masks': masks,
          'averaged_loss': float(loss_fn(averaged))}


if __name__ == '__main__':
  main()
