r"""The reference's train step in PyTorch, to time beside ``benchmarks.step``.

  python benchmarks/torch_reference.py --hidden=200 [--sparse] [--steps=60]

Needs ``pip install torch`` (not a dependency of selfish_jax). It is the step of
Selfish-RNN's stacked LSTM language model (``nn.Embedding`` -> dropout ->
``nn.LSTM`` -> dropout -> ``nn.Linear``, cross-entropy, global-norm clipping at
0.25, SGD with weight decay 1.2e-6, then the masks re-applied to every weight
matrix when ``--sparse``), fp32 on 2 threads, batch 20, bptt 35, on random
tokens. This shared CPU's speed drifts by 15-30 % within minutes, so ratios
are only meaningful between runs taken back to back; this script exists so the
reference can be re-timed beside ours instead of compared with old numbers.
Prints one JSON object like ``benchmarks.step`` (step_ms_p10/p50/p90, tokens_per_s).
"""

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

VOCAB, BATCH, BPTT = 10_000, 20, 35


class _LanguageModel(nn.Module):

  def __init__(self, hidden: int, dropout: float = 0.65):
    super().__init__()
    self.drop = nn.Dropout(dropout)
    self.encoder = nn.Embedding(VOCAB, hidden)
    self.rnn = nn.LSTM(hidden, hidden, 2, dropout=dropout)
    self.decoder = nn.Linear(hidden, VOCAB)

  def forward(self, tokens, carry):
    outputs, carry = self.rnn(self.drop(self.encoder(tokens)), carry)
    return self.decoder(self.drop(outputs)).view(-1, VOCAB), carry


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--hidden', type=int, default=200)
  parser.add_argument('--sparse', action='store_true', help='density 0.33 masks')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--warmup', type=int, default=5)
  args = parser.parse_args()
  torch.set_num_threads(2)
  torch.manual_seed(0)
  model = _LanguageModel(args.hidden)
  optimizer = torch.optim.SGD(model.parameters(), lr=20, weight_decay=1.2e-6)
  masks = {}
  if args.sparse:
    for name, param in model.named_parameters():
      if param.dim() == 2:
        masks[name] = (torch.rand_like(param) < 0.33).float()
        param.data *= masks[name]
  loss_fn = nn.CrossEntropyLoss()
  tokens = torch.randint(0, VOCAB, (BPTT, BATCH))
  targets = torch.randint(0, VOCAB, (BPTT * BATCH,))
  carry = (torch.zeros(2, BATCH, args.hidden), torch.zeros(2, BATCH, args.hidden))

  def step(carry):
    carry = tuple(c.detach() for c in carry)
    optimizer.zero_grad()
    logits, carry = model(tokens, carry)
    loss_fn(logits, targets).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    optimizer.step()
    for name, param in model.named_parameters():
      if name in masks:
        param.data *= masks[name]
    return carry

  for _ in range(args.warmup):
    carry = step(carry)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    carry = step(carry)
    times.append(time.perf_counter() - start)
  step_ms = np.array(times) * 1000
  p50 = float(np.percentile(step_ms, 50))
  print(json.dumps({
      'hidden': args.hidden, 'sparse': args.sparse, 'torch': torch.__version__,
      'tokens_per_s': BATCH * BPTT / (p50 / 1000),
      'step_ms_p10': float(np.percentile(step_ms, 10)), 'step_ms_p50': p50,
      'step_ms_p90': float(np.percentile(step_ms, 90)), 'timed_steps': args.steps}, indent=1))


if __name__ == '__main__':
  main()
