"""Eight sparse trainings in one ``jit(vmap(scan))`` call, and how far their
topologies drifted apart, computed on the device.

Each seed draws its own Erdős–Rényi masks, trains a small MLP with SNT-ASGD
(averaging on from step 50) and a Selfish-RNN topology update every 25 steps
(``lax.cond`` inside ``scan``: the update is a pure function of traced values);
``pairwise_topology_distance`` then compares the eight final topologies.

  python examples/seeds_vmap.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfish_jax import optim, sparsity


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


def main(seeds: int = 8, steps: int = 100, density: float = 0.2) -> dict:
  inputs = jax.random.normal(jax.random.key(0), (256, 32))
  labels = jnp.argmax(inputs[:, :10], axis=1)
  model = MLP()
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, inputs), labels).mean()
  # The selfish method's update, called every 25 steps (as RigL schedules its updates).
  method = sparsity.make_method('selfish', density=density, sparse_init='er', death_rate=0.5,
                                total_steps=steps)
  update_now = lambda step: (step % 25 == 0) & (step > 0)
  tx = optim.snt_asgd(0.5, clip_norm=1.0)

  def train(seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = model.init(keys[0], inputs[:1])['params']
    masks = method.init_masks(keys[1], params)
    params = sparsity.apply_masks(params, masks)
    opt_state = tx.init(params)

    def step(carry, t):
      params, masks, opt_state = carry
      opt_state = jax.lax.cond(t == 50, optim.start_averaging, lambda s: s, opt_state)
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
      params = optax.apply_updates(params, updates)
      params, masks, _ = jax.lax.cond(
          update_now(t + 1), lambda: method.update(params, masks, {}, jax.random.fold_in(
              keys[2], t), t), lambda: (params, masks, {}))
      return (params, masks, opt_state), loss

    (params, masks, opt_state), losses = jax.lax.scan(step, (params, masks, opt_state),
                                                      jnp.arange(steps))
    averaged = optim.averaged_params(opt_state, params, masks)
    return losses, loss_fn(averaged), masks, sparsity.overall_density(masks)

  losses, averaged_loss, masks, density_after = jax.jit(jax.vmap(train))(jnp.arange(seeds))
  distance = jax.jit(sparsity.pairwise_topology_distance)(masks)
  first_layer = distance["['Dense_1']['kernel']"]
  print(f'{seeds} seeds: loss {losses[:, 0].mean():.3f} -> {losses[:, -1].mean():.3f}, averaged '
        f'{averaged_loss.mean():.3f}; density {density_after.min():.4f}; topology distance '
        f'between seeds (first layer) {first_layer[~jnp.eye(seeds, dtype=bool)].mean():.3f}')
  return {'losses': losses, 'averaged_loss': averaged_loss, 'masks': masks,
          'density': density_after, 'distance': distance}


if __name__ == '__main__':
  main()
