"""Sparse training of your own Flax model with any optax optimizer.

An MLP at density 0.1, ``optax.adamw`` made sparse with ``optim.sparsify``,
and RigL's topology update (prune by magnitude, regrow by gradient) every 20
steps inside the same jitted step (``Method.should_update`` is traced, so
``lax.cond`` decides on the device).

  python examples/sparsify_adamw.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfish_jax import optim, sparsity


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(256)(x)))


def main(steps: int = 200, density: float = 0.1) -> dict:
  inputs = jax.random.normal(jax.random.key(0), (512, 32))
  labels = jnp.argmax(inputs[:, :10], axis=1)  # a rule the sparse MLP can learn
  model = MLP()
  params = model.init(jax.random.key(1), inputs[:1])['params']
  masks = sparsity.init_masks(jax.random.key(2), params, density)  # kernels masked, biases dense
  params = sparsity.apply_masks(params, masks)
  method = sparsity.make_method('rigl', density=density, death_rate=0.3, total_steps=steps,
                                every_steps=20)
  tx = optim.sparsify(optax.adamw(3e-3, weight_decay=1e-4))
  opt_state = tx.init(params)

  def loss_fn(p):
    logits = model.apply({'params': p}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train_step(step, params, masks, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
    params = optax.apply_updates(params, updates)
    params, masks, _ = jax.lax.cond(
        method.should_update(step + 1),
        lambda: method.update(params, masks, {}, key, step, grads),  # regrow by gradient
        lambda: (params, masks, {}))
    return params, masks, opt_state, loss

  losses = []
  for step in range(steps):
    params, masks, opt_state, loss = train_step(step, params, masks, opt_state,
                                                jax.random.fold_in(jax.random.key(3), step))
    losses.append(float(loss))
  counts = sparsity.host_numbers(sparsity.active_counts(masks))
  print(f'loss {losses[0]:.3f} -> {losses[-1]:.3f}; active weights per matrix {counts}')
  return {'losses': losses, 'counts': counts, 'params': params, 'masks': masks}


if __name__ == '__main__':
  main()
