"""The model families from Python, in a notebook-sized cell: an AWD-LSTM with a
mixture of softmaxes, built from a config, masked at density 0.33 with its
four LSTM gates in one fused kernel, trained with dropout, DropConnect and the
AR/TAR penalties by Adam made sparse, with a topology update halfway (watch
the gates' densities move), then evaluated.

  python examples/lstm_from_python.py
"""

import jax
import jax.numpy as jnp
import optax

from selfish_jax import config as config_lib
from selfish_jax import models, optim, sparsity
from selfish_jax.models import layers


def main(steps: int = 60, vocab: int = 50) -> dict:
  config = config_lib.default_config()
  config.update(model='awd_lstm_mos', emsize=24, nhid=48, nlayers=2, n_experts=3,
                dropout=0.1, dropout_hidden=0.1, dropout_embedding=0.05, weight_drop=0.2,
                ar_alpha=2.0, tar_beta=1.0, tied=True)
  config_lib.validate(config)
  model = models.build_model(config, vocab)
  params = models.init_params(model, jax.random.key(0))
  masks = sparsity.init_masks(jax.random.key(1), params, 0.33)  # every matrix; biases dense
  params = sparsity.apply_masks(params, masks)

  # A toy language: each word is followed by (word * 7 + 3) % vocab, 80 % of the time.
  def next_word(word, key):
    follow, other = jax.random.uniform(key, (8,)) < 0.8, jax.random.randint(key, (8,), 0, vocab)
    word = jnp.where(follow, (word * 7 + 3) % vocab, other)
    return word, word

  _, tokens = jax.lax.scan(next_word, jnp.arange(8), jax.random.split(jax.random.key(2), 41))
  tokens = tokens.T  # [batch 8, 41 steps]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  weights = jnp.ones(inputs.shape)

  def loss_fn(params, key):
    (head, _), collections = model.apply(
        {'params': params}, inputs, model.initial_carry(8), train=True, weights=weights,
        rngs={'dropout': key}, mutable=[layers.PENALTIES])  # AR/TAR are sown here
    nll = head.weighted_nll_sum(targets, weights) / jnp.sum(weights)
    return nll + layers.total_penalty(collections), nll

  tx = optim.sparsify(optax.adam(1e-2))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, key):
    (_, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
    updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
    return optax.apply_updates(params, updates), opt_state, nll

  evaluate = jax.jit(lambda p: models.eval_nll_sum(
      model, p, inputs, model.initial_carry(8), targets, weights)[0] / jnp.sum(weights))
  before = float(evaluate(params))
  gates_before = sparsity.host_numbers(sparsity.gate_densities(masks, model.gate_layout))
  for step in range(steps):
    params, opt_state, nll = train_step(params, opt_state, jax.random.key(100 + step))
    if step == steps // 2:  # prune 30 % of each matrix, regrow as many at random
      params, masks = sparsity.update_topology(params, masks, jax.random.key(5), 0.3)
  after = float(evaluate(params))
  gates_after = sparsity.host_numbers(sparsity.gate_densities(masks, model.gate_layout))
  kernel = "['lstm_0']['recurrent_kernel']"
  print(f'validation NLL {before:.3f} -> {after:.3f}; density '
        f'{float(sparsity.overall_density(masks)):.4f}; gates of {kernel} '
        f'{gates_before[kernel]} -> {gates_after[kernel]}')
  return {'before': before, 'after': after, 'masks': masks, 'gates_before': gates_before,
          'gates_after': gates_after}


if __name__ == '__main__':
  main()
