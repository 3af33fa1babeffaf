"""Batch-1 language models over an export, in NumPy (products: numba), every masked matrix a
:class:`~selfish_jax.inference.matrices.Matrix` (sparse where that is faster).

Generation and scoring of one sequence read every weight once a token, so a
sparse model can be faster there than the dense one. An engine implements a
family's evaluation-mode step (no dropout; DropConnect's evaluation scaling
where the family has one) from the same parameters as the Flax model, and
gives its log-probabilities to float32 rounding. Every family has one
(:data:`ENGINES`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from selfish_jax.errors import UserError
from selfish_jax.inference.export import Export
from selfish_jax.inference.matrices import Matrix, choose_layouts

State = Any


# In place where it can be: at batch 1 a token's element-wise work is a few thousand numbers,
# and NumPy's temporaries and copies cost more than the arithmetic (2x1500: 0.1 ms a token).


def _sigmoid(x: np.ndarray) -> np.ndarray:
  out = np.multiply(x, np.float32(0.5), dtype=np.float32)
  np.tanh(out, out=out)
  out *= np.float32(0.5)
  out += np.float32(0.5)
  return out


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
  out = np.subtract(logits, logits.max(axis=axis, keepdims=True), dtype=np.float32)
  out -= np.log(np.exp(out).sum(axis=axis, keepdims=True))
  return out


class Engine:
  """What every engine offers; a family's subclass implements :meth:`start` and :meth:`step`."""

  def __init__(self, export: Export, kernel: str = 'auto'):
    self.export, self.kernel = export, kernel
    self.vocab_size = len(export.vocab)

  def _matrix(self, *path: str, transpose: bool = False, lookups: bool = False,
              scale: float = 1.0, rows: int = 1) -> Matrix:
    weights, mask = self.export.params, self.export.masks
    for key in path:
      weights = weights[key]
      mask = mask[key] if mask is not None else None
    if transpose:
      weights, mask = weights.T, None if mask is None else mask.T
    if scale != 1.0:  # as the model scales the matrix, not its product
      weights = (weights * np.float32(scale)).astype(np.float32)
    return Matrix(weights, mask, self.kernel, lookups=lookups, rows=rows, choose=False)

  def _decoder(self, embedding_path: tuple[str, ...], rows: int = 1) -> tuple[Matrix, np.ndarray]:
    params = self.export.params
    if 'decoder_kernel' in params:
      return self._matrix('decoder_kernel', rows=rows), params['decoder_bias']
    return self._matrix(*embedding_path, transpose=True, rows=rows), params['decoder_bias']

  @property
  def matrices(self) -> dict[str, Matrix]:
    """Every weight matrix of the engine by name (their kernels, densities, memory)."""
    return {name: value for name, value in vars(self).items() if isinstance(value, Matrix)}

  def start(self) -> State:
    """The zero state a sequence starts from."""
    raise NotImplementedError

  def step(self, token: int, state: State) -> tuple[np.ndarray, State]:
    """``(log-probabilities of the next token [vocab], state)`` after ``token``."""
    raise NotImplementedError

  def log_probs(self, tokens: Sequence[int]) -> np.ndarray:
    """``[len(tokens), vocab]``: the next-token log-probabilities after each prefix."""
    state, rows = self.start(), []
    for token in tokens:
      row, state = self.step(int(token), state)
      rows.append(row)
    return np.stack(rows)

  def generate(self, prompt: Sequence[int], num_tokens: int, temperature: float = 1.0,
               seed: int = 0) -> list[int]:
    """``num_tokens`` ids continuing ``prompt``: drawn from ``softmax(logits /
    temperature)``, or the most likely ones at ``temperature == 0``."""
    rng = np.random.default_rng(seed)
    state, row = self.start(), None
    for token in prompt:
      row, state = self.step(int(token), state)
    tokens = []
    for _ in range(num_tokens):
      if temperature > 0:
        probs = np.exp(log_softmax(row / temperature).astype(np.float64))
        token = int(rng.choice(self.vocab_size, p=probs / probs.sum()))
      else:
        token = int(np.argmax(row))
      tokens.append(token)
      row, state = self.step(token, state)
    return tokens


class LSTMEngine(Engine):
  """The stacked LSTM (``model='lstm'``): gates i, f, g, o of one fused kernel.
  Subclasses of other stacked cells set :attr:`LAYER` and override :meth:`_cell`
  (and :meth:`_init_head` for another output layer)."""

  LAYER = 'lstm'  # the layers' parameter names: LAYER_0, LAYER_1, ...

  def __init__(self, export: Export, kernel: str = 'auto'):
    super().__init__(export, kernel)
    params = export.params
    self.layers = int(export.config['nlayers'])
    self.embedding = self._matrix('embedding', lookups=True)
    for layer in range(self.layers):
      name = f'{self.LAYER}_{layer}'
      setattr(self, f'{name}_input', self._matrix(name, 'input_kernel'))
      setattr(self, f'{name}_recurrent', self._matrix(name, 'recurrent_kernel',
                                                      scale=self._recurrent_scale()))
    self._biases = [params[f'{self.LAYER}_{l}']['input_bias']
                    + params[f'{self.LAYER}_{l}']['recurrent_bias'] for l in range(self.layers)]
    self._init_head()

  def _recurrent_scale(self) -> float:
    """What the model multiplies its recurrent kernels by at evaluation."""
    return 1.0

  def _init_head(self) -> None:
    self.decoder, self._decoder_bias = self._decoder(('embedding',))

  def _recurrent(self, layer: int) -> Matrix:
    return getattr(self, f'{self.LAYER}_{layer}_recurrent')

  def start(self) -> State:
    sizes = [self._recurrent(layer).shape[0] for layer in range(self.layers)]
    return [(np.zeros(size, np.float32), np.zeros(size, np.float32)) for size in sizes]

  def _cell(self, pre: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(h, c)`` from the fused pre-activations and the previous cell."""
    gates = _sigmoid(pre).reshape(4, -1)  # g's sigmoid is wasted, one call cheaper than three
    c = gates[1] * c + gates[0] * np.tanh(pre.reshape(4, -1)[2])
    return gates[3] * np.tanh(c), c

  def _stack(self, token: int, state: State) -> tuple[np.ndarray, State]:
    """The last layer's output and the new state."""
    x, new_state = self.embedding.row(token), []
    for layer, (h, c) in enumerate(state):
      pre = (getattr(self, f'{self.LAYER}_{layer}_input').product(x) + self._biases[layer]
             + self._recurrent(layer).product(h))
      x, c = self._cell(pre, c)
      new_state.append((x, c))
    return x, new_state

  def step(self, token: int, state: State) -> tuple[np.ndarray, State]:
    x, state = self._stack(token, state)
    return log_softmax(self.decoder.product(x) + self._decoder_bias), state


class RHNEngine(Engine):
  """The Recurrent Highway Network (``model='rhn'``): ``rhn_depth`` micro-steps a
  token, gates h and t of one fused kernel each, carry gate ``1 - t``."""

  def __init__(self, export: Export, kernel: str = 'auto'):
    super().__init__(export, kernel)
    rhn = export.params['rhn']
    self.depth = int(export.config['rhn_depth'])
    self.embedding = self._matrix('embedding', lookups=True)
    self.rhn_input = self._matrix('rhn', 'input_kernel')
    for l in range(self.depth):
      setattr(self, f'rhn_recurrent_{l}', self._matrix('rhn', f'recurrent_kernel_{l}'))
    self._input_bias = rhn.get('input_bias', np.zeros(rhn['input_kernel'].shape[1], np.float32))
    self._biases = [rhn[f'bias_{l}'] for l in range(self.depth)]
    self.decoder, self._decoder_bias = self._decoder(('embedding',))

  def start(self) -> State:
    return np.zeros(int(self.export.config['nhid']), np.float32)

  def step(self, token: int, state: State) -> tuple[np.ndarray, State]:
    projected = self.rhn_input.product(self.embedding.row(token)) + self._input_bias
    s = state
    for l in range(self.depth):
      pre = getattr(self, f'rhn_recurrent_{l}').product(s) + self._biases[l]
      if l == 0:
        pre = pre + projected
      h, t = pre.reshape(2, -1)
      t = _sigmoid(t)
      s = (np.tanh(h) * t + s * (1 - t)).astype(np.float32)
    return log_softmax(self.decoder.product(s) + self._decoder_bias), s


def _cumax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max())
  return np.cumsum(e / e.sum()).astype(np.float32)


class ONLSTMEngine(LSTMEngine):
  """The Ordered-Neurons LSTM (``model='onlstm'``): fused kernels of columns
  ``[master_i (n), master_f (n), o, g, i, f]``, ``n`` chunks of ``chunk_size``
  units; the recurrent kernels scaled by ``1 - weight_drop`` as ON-LSTM's
  DropConnect evaluates."""

  LAYER = 'onlstm'

  def __init__(self, export: Export, kernel: str = 'auto'):
    self.chunk_size = int(export.config['chunk_size'])
    super().__init__(export, kernel)

  def _recurrent_scale(self) -> float:
    return 1.0 - float(self.export.config.get('weight_drop', 0.0))

  def _cell(self, pre: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    chunks = len(c) // self.chunk_size
    master_i = np.repeat(1.0 - _cumax(pre[:chunks]), self.chunk_size)
    master_f = np.repeat(_cumax(pre[chunks:2 * chunks]), self.chunk_size)
    o, g, i, f = pre[2 * chunks:].reshape(4, -1)
    overlap = master_f * master_i
    f = _sigmoid(f) * overlap + (master_f - overlap)
    i = _sigmoid(i) * overlap + (master_i - overlap)
    c = (f * c + i * np.tanh(g)).astype(np.float32)
    return (_sigmoid(o) * np.tanh(c)).astype(np.float32), c


class MixtureOfSoftmaxesEngine(LSTMEngine):
  """AWD-LSTM-MoS (``model='awd_lstm_mos'``): the LSTM stack (its DropConnect
  leaves the weights as they are at evaluation), then ``n_experts`` softmaxes
  of the latent vectors mixed by the prior; the decoder takes the experts'
  latent vectors as one ``[n_experts, emsize]`` product."""

  def _init_head(self) -> None:
    self.experts = int(self.export.config['n_experts'])
    self.latent = self._matrix('latent_kernel')
    self.prior = self._matrix('prior_kernel')
    self._latent_bias = self.export.params['latent_bias']
    self.decoder, self._decoder_bias = self._decoder(('embedding',), rows=self.experts)

  def step(self, token: int, state: State) -> tuple[np.ndarray, State]:
    x, state = self._stack(token, state)
    latent = np.tanh(self.latent.product(x) + self._latent_bias).reshape(self.experts, -1)
    log_experts = log_softmax(
        self.decoder.product(latent) + self._decoder_bias, axis=1)
    mixed = log_experts + log_softmax(self.prior.product(x))[:, None]
    top = mixed.max(axis=0)
    return (top + np.log(np.exp(mixed - top).sum(axis=0))).astype(np.float32), state


# The families with a batch-1 engine: all of them.
ENGINES = {'lstm': LSTMEngine, 'rhn': RHNEngine, 'onlstm': ONLSTMEngine,
           'awd_lstm_mos': MixtureOfSoftmaxesEngine}


def engine_for(export: Export, kernel: str = 'auto') -> Engine:
  """The batch-1 engine of the export's family, each matrix in the layout it
  measured fastest in passes over the model (``kernel='auto'``) or in ``kernel``."""
  if export.family not in ENGINES:
    raise UserError(f'no batch-1 sparse engine for the family {export.family!r} (there are for '
                    f'{tuple(ENGINES)}); evaluate its export with the Flax model instead')
  engine = ENGINES[export.family](export, kernel)
  choose_layouts(engine.matrices.values())  # in the order a step reads them
  return engine
