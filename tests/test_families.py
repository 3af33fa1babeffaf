"""The model families behind one interface: each against an independent
reference, their masks and gate bookkeeping, training with every method and
optimizer, and resuming."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_until
from selfish_jax import config as config_lib
from selfish_jax import flops, models, sparsity
from selfish_jax.models import layers
from selfish_jax.errors import ConfigError
from selfish_jax.training import metrics as metrics_lib
from selfish_jax.training import language_model_steps as steps
from selfish_jax.training import setup
from selfish_jax.training.language_modelling import train_and_evaluate

VOCAB = 40
NEW_FAMILIES = ('rhn', 'onlstm', 'awd_lstm_mos')
# Tiny sizes per family (every regulariser on, so training exercises them).
TINY = {
    'lstm': dict(emsize=8, nhid=12, nlayers=2, dropout=0.1),
    'rhn': dict(emsize=12, nhid=12, nlayers=1, rhn_depth=3, tied=True, dropout=0.1,
                dropout_input=0.1, dropout_hidden=0.1, dropout_embedding=0.1),
    'onlstm': dict(emsize=8, nhid=12, nlayers=3, chunk_size=4, tied=True, dropout=0.1,
                   dropout_input=0.1, dropout_hidden=0.1, dropout_embedding=0.1,
                   weight_drop=0.1, ar_alpha=0.5, tar_beta=0.5),
    'awd_lstm_mos': dict(emsize=8, nhid=12, nhid_last=10, nlayers=3, n_experts=3, tied=True,
                         dropout=0.1, dropout_input=0.1, dropout_hidden=0.1,
                         dropout_embedding=0.1, dropout_latent=0.1, weight_drop=0.1,
                         ar_alpha=0.5, tar_beta=0.5),
}


def _config(model, **overrides):
  config = config_lib.default_config()
  config.update(model=model, batch_size=4, eval_batch_size=4, bptt=6, lr=5.0, death_rate=0.5,
                **TINY[model])
  config.update(**overrides)
  return config_lib.validate(config)


def _model_and_params(model, **overrides):
  net = models.build_model(_config(model, **overrides), VOCAB)
  return net, models.init_params(net, jax.random.key(0))


sigmoid = jax.nn.sigmoid


def _nll(logits, targets):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]


# Independent references: per-step Python loops written from the papers'
# equations, on the parameter dicts, differentiated by plain autodiff.

def _rhn_reference(p, tokens, targets, depth):
  embedding, cell = p['embedding'], p['rhn']
  s = jnp.zeros((tokens.shape[0], cell['recurrent_kernel_0'].shape[0]))
  nlls = []
  for t in range(tokens.shape[1]):
    x = embedding[tokens[:, t]]
    for l in range(depth):
      pre = s @ cell[f'recurrent_kernel_{l}'] + cell[f'bias_{l}']
      if l == 0:  # W's own bias beside R_0's (nn.Linear, the official HighwayBlock)
        pre = pre + x @ cell['input_kernel'] + cell['input_bias']
      half = pre.shape[1] // 2
      h, transform = jnp.tanh(pre[:, :half]), sigmoid(pre[:, half:])
      s = h * transform + s * (1 - transform)  # coupled carry gate c = 1 - t
    nlls.append(_nll(s @ embedding.T + p['decoder_bias'], targets[:, t]))
  return jnp.stack(nlls, axis=1), None


def _onlstm_reference(p, tokens, targets, chunk, weight_drop):
  """The official ON-LSTM cell: view(-1, 4n, chunk).chunk(4) and broadcasting;
  at evaluation LinearDropConnect uses the recurrent weights times (1 - p)."""
  x_seq = [p['embedding'][tokens[:, t]] for t in range(tokens.shape[1])]
  for layer in range(3):
    cell = p[f'onlstm_{layer}']
    hidden = cell['recurrent_kernel'].shape[0]
    n = hidden // chunk
    h, c = jnp.zeros((tokens.shape[0], hidden)), jnp.zeros((tokens.shape[0], n, chunk))
    outputs = []
    for x in x_seq:
      g = (x @ cell['input_kernel'] + cell['input_bias']
           + h @ (cell['recurrent_kernel'] * (1 - weight_drop)) + cell['recurrent_bias'])
      cin = 1 - jnp.cumsum(jax.nn.softmax(g[:, :n]), axis=1)
      cf = jnp.cumsum(jax.nn.softmax(g[:, n:2 * n]), axis=1)
      o, cell_in, i, f = jnp.split(g[:, 2 * n:].reshape(-1, 4 * n, chunk), 4, axis=1)
      cin, cf = cin[:, :, None], cf[:, :, None]
      overlap = cf * cin
      f = sigmoid(f) * overlap + (cf - overlap)
      i = sigmoid(i) * overlap + (cin - overlap)
      c = f * c + i * jnp.tanh(cell_in)
      h = (sigmoid(o) * jnp.tanh(c)).reshape(-1, hidden)
      outputs.append(h)
    x_seq = outputs
  logits = [h @ p['embedding'].T + p['decoder_bias'] for h in x_seq]
  nll = jnp.stack([_nll(l, targets[:, t]) for t, l in enumerate(logits)], axis=1)
  return nll, jnp.stack(x_seq)


def _mos_reference(p, tokens, targets, experts):
  """Three PyTorch LSTMs, then the mixture in probability space, as the MoS code."""
  x_seq = [p['embedding'][tokens[:, t]] for t in range(tokens.shape[1])]
  for layer in range(3):
    cell = p[f'lstm_{layer}']
    hidden = cell['recurrent_kernel'].shape[0]
    h = c = jnp.zeros((tokens.shape[0], hidden))
    outputs = []
    for x in x_seq:
      i, f, g, o = jnp.split(x @ cell['input_kernel'] + h @ cell['recurrent_kernel']
                             + cell['input_bias'] + cell['recurrent_bias'], 4, axis=1)
      c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
      h = sigmoid(o) * jnp.tanh(c)
      outputs.append(h)
    x_seq = outputs
  nlls = []
  for t, h in enumerate(x_seq):
    latent = jnp.tanh(h @ p['latent_kernel'] + p['latent_bias']).reshape(h.shape[0], experts, -1)
    prior = jax.nn.softmax(h @ p['prior_kernel'], axis=1)
    probs = jax.nn.softmax(latent @ p['embedding'].T + p['decoder_bias'], axis=-1)
    mixture = jnp.sum(prior[:, :, None] * probs, axis=1)
    nlls.append(-jnp.log(jnp.take_along_axis(mixture, targets[:, t][:, None], axis=1)[:, 0]))
  return jnp.stack(nlls, axis=1), jnp.stack(x_seq)


FUSED_KERNELS = {'lstm': 4, 'rhn': 4, 'onlstm': 6, 'awd_lstm_mos': 6}  # at the TINY sizes
REFERENCES = {
    'rhn': lambda p, x, y: _rhn_reference(p, x, y, depth=3),
    'onlstm': lambda p, x, y: _onlstm_reference(p, x, y, chunk=4,
                                                weight_drop=TINY['onlstm']['weight_drop']),
    'awd_lstm_mos': lambda p, x, y: _mos_reference(p, x, y, experts=3),
}


@pytest.mark.parametrize('model', NEW_FAMILIES)
def test_forward_and_gradient_match_an_independent_reference(model):
  net, params = _model_and_params(model, loss_chunk_rows=8)  # chunked loss: 2 steps x 4 rows
  tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, VOCAB)
  targets = jax.random.randint(jax.random.key(2), (4, 6), 0, VOCAB)
  weights = jax.random.uniform(jax.random.key(3), (4, 6), minval=0.5)
  carry = net.initial_carry(4)
  nll, _ = models.token_nll(net, params, tokens, carry, targets)
  want, _ = REFERENCES[model](params, tokens, targets)
  np.testing.assert_allclose(nll, want, rtol=2e-5, atol=2e-5)
  assert float(jnp.mean(want)) == pytest.approx(math.log(VOCAB), rel=0.1)  # near uniform
  logits, _ = models.logits(net, params, tokens, carry)
  np.testing.assert_allclose(_nll(logits.reshape(-1, VOCAB), targets.reshape(-1)),
                             want.reshape(-1), rtol=2e-5, atol=2e-5)
  ours = jax.grad(lambda p: models.eval_nll_sum(net, p, tokens, carry, targets,
                                                   weights)[0])(params)
  reference = jax.grad(lambda p: jnp.sum(weights * REFERENCES[model](p, tokens, targets)[0]))(
      params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0],
                          jax.tree.leaves(reference)):
    scale = float(jnp.max(jnp.abs(b)))
    assert scale > 0, path
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=str(path))


@pytest.mark.parametrize('model,ar_of', [('onlstm', 'raw'), ('awd_lstm_mos', 'dropped')])
def test_activation_penalties_are_ar_and_tar_of_the_last_layer(model, ar_of, monkeypatch):
  """AR penalises the last layer's output as each official script does: ON-LSTM's
  before its output dropout (main_ONLSTM.py reads the stack's undropped last
  output), AWD-LSTM-MoS's after it; TAR the undropped output in both."""
  # Every dropout off but the output's (weight_drop off: the reference runs
  # the evaluation-time recurrent weights).
  zero = {k: 0.0 for k in ('dropout_input', 'dropout_hidden', 'dropout_embedding',
                           'dropout_latent', 'weight_drop') if k in TINY[model]}
  net, params = _model_and_params(model, ar_alpha=2.0, tar_beta=1.0, dropout=0.5, **zero)
  tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, VOCAB)
  weights = jnp.ones((4, 6)).at[1, 4:].set(0.0)  # row 1 padded after 4 steps
  real_sow = layers.sow_activation_penalties

  def probing_sow(module, activation, raw, valid, alpha, beta):  # also sows what AR reads
    module.sow('probe', 'ar_input', activation)
    real_sow(module, activation, raw, valid, alpha, beta)

  monkeypatch.setattr(layers, 'sow_activation_penalties', probing_sow)
  _, collections = net.apply({'params': params}, tokens, net.initial_carry(4), train=True,
                             weights=weights, rngs={'dropout': jax.random.key(0)},
                             mutable=[layers.PENALTIES, 'probe'])
  penalty = float(layers.total_penalty(collections))
  ar_input = np.asarray(collections['probe']['ar_input'][0])
  if model == 'onlstm':  # [T, B, H] undropped last-layer outputs
    _, hs = _onlstm_reference(params, tokens, tokens, chunk=4, weight_drop=0.0)
  else:
    _, hs = REFERENCES[model](params, tokens, tokens)
  hs = np.asarray(hs)
  valid = np.broadcast_to(np.asarray(weights.T, bool)[..., None], hs.shape)
  ratio = np.divide(ar_input, hs, out=np.zeros_like(hs), where=np.abs(hs) > 1e-6)[valid]
  if ar_of == 'raw':  # (the reference does not hold its state through padding)
    np.testing.assert_allclose(ar_input[valid], hs[valid], rtol=1e-4, atol=1e-6)
  else:  # locked dropout at 0.5: every unit is dropped (x0) or kept (x2)
    kept = np.isclose(ratio, 2.0, rtol=1e-3)
    assert np.all(kept | np.isclose(ratio, 0.0, atol=1e-6)) and 0.2 < kept.mean() < 0.8
  ar = np.mean(np.square(ar_input)[valid])
  pairs = valid[1:] & valid[:-1]  # TAR over consecutive real steps
  tar = np.mean(np.square(np.diff(hs, axis=0))[pairs])
  assert penalty == pytest.approx(2.0 * ar + 1.0 * tar, rel=1e-4)
  window = steps.Windows(tokens, tokens, weights)
  _, no_penalty, _ = steps.window_loss(net, params, net.initial_carry(4), window, train=False)
  assert float(no_penalty) == 0.0


@pytest.mark.parametrize('inverted,train_scale,eval_scale', [(True, 2.0, 1.0), (False, 1.0, 0.5)])
def test_drop_connect_scales_in_training_or_at_evaluation(inverted, train_scale, eval_scale):
  """AWD-LSTM's WeightDrop (inverted) against ON-LSTM's LinearDropConnect, at p = 0.5."""

  class Holder(nn.Module):
    @nn.compact
    def __call__(self, kernel, train):
      return layers.drop_connect(self, kernel, 0.5, train, inverted=inverted)

  kernel = jax.random.normal(jax.random.key(0), (40, 50)) + 3.0  # no zeros
  dropped = np.asarray(Holder().apply({}, kernel, True, rngs={'dropout': jax.random.key(1)}))
  kept = dropped != 0
  assert 0.4 < kept.mean() < 0.6
  np.testing.assert_allclose(dropped[kept], train_scale * np.asarray(kernel)[kept], rtol=1e-6)
  np.testing.assert_allclose(Holder().apply({}, kernel, False), eval_scale * kernel, rtol=1e-6)


def test_each_family_uses_its_official_drop_connect(monkeypatch):
  seen = {}
  real = layers.drop_connect

  def recording(module, kernel, rate, train, *, inverted=True):
    seen.setdefault(type(module).__name__, set()).add(inverted)
    return real(module, kernel, rate, train, inverted=inverted)

  monkeypatch.setattr(layers, 'drop_connect', recording)
  for model in ('onlstm', 'awd_lstm_mos'):
    net, params = _model_and_params(model)
    net.apply({'params': params}, jnp.zeros((2, 3), jnp.int32), net.initial_carry(2), train=True,
              rngs={'dropout': jax.random.key(0)}, mutable=[layers.PENALTIES])
  assert seen == {'ONLSTMLayer': {False}, 'LSTMLayer': {True}}


def test_rhn_initialisations():
  """The official Selfish-RNN RHN (nn.Linear defaults, two depth-0 biases,
  embedding U(+-0.1)) and Zilly's (U(+-0.04), transform bias -2)."""
  def check_uniform(x, bound):
    x = np.asarray(x).ravel()
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
    assert np.std(x) == pytest.approx(bound / np.sqrt(3), rel=0.1)

  size = 64
  dims = dict(emsize=size, nhid=size, rhn_depth=2, nlayers=1, tied=True)
  _, params = _model_and_params('rhn', **dims)
  cell = params['rhn']
  assert sorted(cell) == ['bias_0', 'bias_1', 'input_bias', 'input_kernel',
                          'recurrent_kernel_0', 'recurrent_kernel_1']
  for name in ('input_kernel', 'input_bias', 'recurrent_kernel_0', 'recurrent_kernel_1',
               'bias_0', 'bias_1'):
    check_uniform(cell[name], 1 / np.sqrt(size))
  check_uniform(params['embedding'], 0.1)
  assert not np.any(params['decoder_bias'])
  _, params = _model_and_params('rhn', rhn_init='zilly', **dims)
  cell = params['rhn']
  assert 'input_bias' not in cell
  for name in ('input_kernel', 'recurrent_kernel_0', 'recurrent_kernel_1'):
    check_uniform(cell[name], 0.04)
  check_uniform(params['embedding'], 0.04)
  for name in ('bias_0', 'bias_1'):
    np.testing.assert_array_equal(cell[name], [0.0] * size + [-2.0] * size)
  with pytest.raises(ConfigError, match="rhn_transform_bias is read only with rhn_init='zilly'"):
    _config('rhn', rhn_transform_bias=-1.0)


@pytest.mark.parametrize('model', models.MODELS)
def test_padding_holds_the_state_of_every_family(model):
  net, params = _model_and_params(model)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, VOCAB)
  weights = jnp.ones((2, 6)).at[:, 4:].set(0.0)
  carry = net.initial_carry(2)
  _, padded = models.eval_nll_sum(net, params, tokens, carry, tokens, weights)
  _, short = models.eval_nll_sum(net, params, tokens[:, :4], carry, tokens[:, :4],
                                     weights[:, :4])
  for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(short)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _layout_of(net, params):
  return {jax.tree_util.keystr(path): net.gate_layout(sparsity.key_names(path), p.shape)
          for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_gate_layouts_name_each_familys_gates():
  rhn, rhn_params = _model_and_params('rhn')
  layout = _layout_of(rhn, rhn_params)
  assert layout["['rhn']['input_kernel']"] == (('h', 12), ('t', 12))
  for depth in range(3):
    assert layout[f"['rhn']['recurrent_kernel_{depth}']"] == (('h', 12), ('t', 12))
  assert layout["['embedding']"] is None and layout["['rhn']['bias_0']"] is None
  onlstm, onlstm_params = _model_and_params('onlstm')
  layout = _layout_of(onlstm, onlstm_params)
  # Hidden 12, chunk 4: 3 levels per master gate; the last layer is emsize 8 wide.
  assert layout["['onlstm_0']['recurrent_kernel']"] == (
      ('master_i', 3), ('master_f', 3), ('o', 12), ('g', 12), ('i', 12), ('f', 12))
  assert layout["['onlstm_2']['input_kernel']"] == (
      ('master_i', 2), ('master_f', 2), ('o', 8), ('g', 8), ('i', 8), ('f', 8))
  mos, mos_params = _model_and_params('awd_lstm_mos')
  layout = _layout_of(mos, mos_params)
  assert layout["['lstm_2']['recurrent_kernel']"] == (('i', 10), ('f', 10), ('g', 10), ('o', 10))
  assert layout["['latent_kernel']"] is None and layout["['prior_kernel']"] is None


def test_onlstm_master_gate_columns_drive_the_master_gates():
  # A mask active only in master_f's columns reports exactly that block, and
  # those columns are the ones the cell reads as the master forget gate.
  net, params = _model_and_params('onlstm')
  kernel = params['onlstm_0']['recurrent_kernel']
  mask = np.zeros(kernel.shape, bool)
  mask[:, 3:6] = True
  densities = sparsity.gate_densities({'onlstm_0': {'recurrent_kernel': mask}}, net.gate_layout)
  assert densities["['onlstm_0']['recurrent_kernel']"] == {
      'master_i': 0.0, 'master_f': 1.0, 'o': 0.0, 'g': 0.0, 'i': 0.0, 'f': 0.0}
  # Huge master_f pre-activations on the last level only: cumax -> [0, 0, 1], so
  # the two lower levels (units 0-7) forget everything and the cell keeps
  # exactly its master-i/input contribution there.
  pre = jnp.zeros((1, 54)).at[0, 5].set(50.0)
  c_prev = jnp.full((1, 12), 7.0)
  _, c = models.onlstm.onlstm_cell(pre, c_prev, 4)
  kept = np.asarray(c[0] > 3.0)
  np.testing.assert_array_equal(kept, [False] * 8 + [True] * 4)


@pytest.mark.parametrize('model', models.MODELS)
def test_masks_cover_every_matrix_with_exact_counts(model):
  net, params = _model_and_params(model)
  masks = sparsity.init_masks(jax.random.key(1), params, 0.4)
  for path, param in jax.tree_util.tree_flatten_with_path(params)[0]:
    mask = functools.reduce(lambda tree, entry: tree[entry.key], path, masks)
    if param.ndim < 2:
      assert mask is None, path
    else:
      assert int(np.sum(mask)) == round(0.4 * param.size), path
  assert len(sparsity.gate_densities(masks, net.gate_layout)) == FUSED_KERNELS[model]
  # After a topology update every matrix keeps its count, and the gates'
  # densities weighted by their widths add up to it.
  initial = sparsity.active_counts(masks)
  params = sparsity.apply_masks(params, masks)
  params, masks = jax.jit(lambda p, m: sparsity.update_topology(p, m, jax.random.key(2), 0.5))(
      params, masks)
  counts = sparsity.active_counts(masks)
  assert counts == initial
  leaves = {jax.tree_util.keystr(path): (sparsity.key_names(path), p)
            for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, densities in sparsity.gate_densities(masks, net.gate_layout).items():
    names, leaf = leaves[name]
    widths = dict(net.gate_layout(names, leaf.shape))
    assert sum(d * widths[g] * leaf.shape[0] for g, d in densities.items()) == pytest.approx(
        counts[name])


def test_flops_count_each_expert_of_the_mixture():
  net, params = _model_and_params('awd_lstm_mos')
  dense = sparsity.dense_masks(params)
  total = flops.forward_flops_per_token(params, dense, net.weight_uses)
  lstm = sum(p['input_kernel'].size + p['recurrent_kernel'].size
             for k, p in params.items() if k.startswith('lstm'))
  head = params['latent_kernel'].size + params['prior_kernel'].size
  assert total == 2 * (lstm + head + 3 * params['embedding'].size)


@pytest.mark.parametrize('key,value,message', [
    ('model', 'transformer', "unknown model 'transformer'"),
    ('chunk_size', 5, "model 'lstm' does not use chunk_size \\(used by onlstm\\)"),
    ('n_experts', 2, "does not use n_experts \\(used by awd_lstm_mos\\)"),
])
def test_model_config_errors_are_named(key, value, message):
  config = config_lib.default_config()
  config[key] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_family_constraints_are_named():
  with pytest.raises(ConfigError, match='nlayers must be 1'):
    _config('rhn', nlayers=2)
  with pytest.raises(ConfigError, match='not a multiple of chunk_size=4'):
    _config('onlstm', nhid=10)


@functools.lru_cache(maxsize=None)
def _train_step(model, optimizer, lr):
  """``(model, grad_fn, jitted train step)``, compiled once for all methods
  of a family (the masks' structure only differs between dense and sparse)."""
  config = _config(model, optimizer=optimizer, lr=lr)
  net = models.build_model(config, VOCAB)
  grad_fn = steps.make_grad_fn(net)
  core = setup.build_core(config, 4, net.gate_layout, jax.random.key(0))
  return net, grad_fn, jax.jit(core.train_step(grad_fn))


PER_MATRIX = ('static', 'selfish', 'set', 'rigl')


@pytest.mark.parametrize('model', NEW_FAMILIES)
@pytest.mark.parametrize('method,optimizer', [
    ('dense', 'snt_asgd'), ('static', 'snt_asgd'), ('selfish', 'snt_asgd'), ('set', 'snt_asgd'),
    ('rigl', 'snt_asgd'), ('snfs', 'momentum'), ('dsr', 'snt_asgd'), ('gmp', 'snt_asgd'),
    ('selfish', 'sgd'), ('selfish', 'adam')])
def test_every_family_trains_with_every_method_and_optimizer(model, method, optimizer):
  lr = {'momentum': 1.0, 'adam': 0.05}.get(optimizer, 5.0)
  config = _config(model, method=method, optimizer=optimizer, density=0.4, lr=lr)
  net, grad_fn, train_step = _train_step(model, optimizer, lr)
  core = setup.build_core(config, 4, net.gate_layout, jax.random.key(0))
  method_ = core.method
  params_key, mask_key = jax.random.split(jax.random.key(0))
  state = core.init_state(models.init_params(net, params_key), mask_key,
                          net.initial_carry(config.batch_size))
  window = steps.Windows(jax.random.randint(jax.random.key(1), (4, 6), 0, VOCAB),
                         jax.random.randint(jax.random.key(2), (4, 6), 0, VOCAB),
                         jnp.ones((4, 6)))
  losses = []
  for _ in range(8):  # the same window: the loss must fall
    state, loss = train_step(state, window, jax.random.key(3))
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
  if not method_.sparse:
    assert all(m is None for m in jax.tree.leaves(state.masks, is_leaf=lambda x: x is None))
    return
  before = sparsity.active_counts(state.masks)
  size = sum(m.size for m in jax.tree.leaves(state.masks))
  # GMP starts dense and prunes; every other method starts at the density.
  expected = size if method == 'gmp' else 0.4 * size
  assert sum(before.values()) == pytest.approx(expected, abs=len(before))
  if method_.update is None:  # static
    return
  scores = core.growth_scores(state)  # the last step's gradient, or momentum
  assert (scores is None) == (method_.grows_by is None)
  params, masks, _ = jax.jit(method_.update)(state.params, state.masks, state.method_state,
                                             jax.random.key(5), jnp.int32(4), scores)
  after = sparsity.active_counts(masks)
  if method in PER_MATRIX:
    assert after == before
  elif method == 'gmp':  # prunes from dense toward 0.4
    assert sum(after.values()) < sum(before.values())
  else:  # snfs, dsr: the total
    assert sum(after.values()) == sum(before.values())
  if method in ('selfish', 'set', 'rigl', 'snfs', 'dsr'):
    assert any(d > 0 for d in sparsity.topology_distance(state.masks, masks).values())
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
    if m is not None:
      assert not np.any(np.asarray(p)[~np.asarray(m)])
  state, loss = train_step(state.replace(params=params, masks=masks), window, jax.random.key(3))
  assert np.isfinite(float(loss))


@pytest.mark.parametrize('model', NEW_FAMILIES)
def test_each_family_resumes_to_identical_results(model, text_corpus_dir, tmp_path, monkeypatch):
  # Variable BPTT for the AWD families: the resumed epoch draws the same windows.
  config = _config(model, dataset='text', data_dir=text_corpus_dir, download=False,
                   eval_batch_size=64,
                   num_epochs=2, max_steps_per_epoch=6, checkpoint_every_steps=2, log_every=1,
                   lr=2.0, variable_bptt=model != 'rhn', max_bptt_delta=3)
  straight = train_and_evaluate(config, str(tmp_path / 'straight'))
  # Die in epoch 2, past the checkpoint of step 8, then resume.
  run_until(monkeypatch, lambda: train_and_evaluate(config, str(tmp_path / 'resumed')),
            lambda record: record.get('step') == 9 and 'loss' in record)
  assert train_and_evaluate(config, str(tmp_path / 'resumed')) == straight
  records = {}
  for run in ('straight', 'resumed'):
    records[run] = [{k: v for k, v in r.items() if k not in ('epoch_time_s', 'ms_per_step',
                                                              'tokens_per_s',
                                                              'train_tokens_per_s')}
                    for r in metrics_lib.read_records(str(tmp_path / run / 'metrics.jsonl'))]
  assert records['resumed'] == records['straight']
  epochs = [r for r in records['straight'] if r['kind'] == 'epoch']
  assert len(epochs) == 2 and epochs[1]['val_ppl'] < epochs[0]['val_ppl']
  assert len(epochs[0]['gate_density']) == FUSED_KERNELS[model]


class _BigramLM(nn.Module):
  """A fifth family in a few lines: each word predicts the next through one matrix."""
  vocab_size: int
  emsize: int
  init_scale: float
  nhid: int = 0
  tied: bool = False
  dropout: float = 0.0
  compute_dtype: jnp.dtype = jnp.float32
  loss_chunk_rows: int = 0

  def initial_carry(self, batch_size):
    return ()

  def gate_layout(self, names, shape):
    return None

  def weight_uses(self, names):
    return 0 if names[-1] == 'embedding' else 1

  @nn.compact
  def __call__(self, tokens, carry, *, train, weights=None):
    init = nn.initializers.uniform(self.init_scale)
    embedding = self.param('embedding', init, (self.vocab_size, self.emsize))
    kernel = self.param('decoder_kernel', init, (self.emsize, self.vocab_size))
    bias = self.param('decoder_bias', nn.initializers.zeros, (self.vocab_size,))
    return models.SoftmaxHead(jnp.take(embedding, tokens.T, axis=0), kernel, bias,
                              self.loss_chunk_rows), carry


def test_a_fifth_family_is_its_module_and_its_family_entry(text_corpus_dir, tmp_path,
                                                            monkeypatch):
  """Registering a Family is all a new model takes: its key joins the config with
  its default, other families refuse it, and the sparse training loop trains it."""
  from conftest import make_tiny_config
  from selfish_jax.models.family import Family
  monkeypatch.setitem(models.FAMILIES, 'bigram', Family(
      'bigram', {'bigram_init_scale': 0.1},
      lambda values, vocab, common: _BigramLM(vocab_size=vocab,
                                              init_scale=values['bigram_init_scale'], **common)))
  config = make_tiny_config(text_corpus_dir, dataset='text')
  assert config.bigram_init_scale == 0.1
  config.bigram_init_scale = 0.5
  with pytest.raises(ConfigError, match=r"model 'lstm' does not use bigram_init_scale "
                                        r'\(used by bigram\)'):
    train_and_evaluate(config, str(tmp_path / 'lstm'))
  config.update(model='bigram', num_epochs=2, max_steps_per_epoch=30, lr=20.0)
  final = train_and_evaluate(config, str(tmp_path / 'bigram'))
  epochs = metrics_lib.read_records(str(tmp_path / 'bigram'), metrics_lib.EPOCH)
  assert epochs[1]['val_ppl'] < epochs[0]['val_ppl'] < 41  # below uniform over 41 words
  assert final['density'] == pytest.approx(0.33, abs=0.01)  # both matrices masked
