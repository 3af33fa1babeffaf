"""``train_and_evaluate``: the epoch loop of Selfish-RNN with SNT-ASGD.

Per epoch, as in the reference: train on every BPTT window; validate (on the
averaged weights once SNT-ASGD is on) and keep the best weights; in the SGD
phase apply the non-monotone trigger; update the topology (except in the epoch
whose validation triggered the switch, as the reference does); checkpoint.
After the last epoch the best weights are tested.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from selfish_jax import config as config_lib
from selfish_jax import flops, models, optim, sparsity
from selfish_jax.data import batchify, batching, load_corpus
from selfish_jax.errors import Preempted, TrainingDiverged
from selfish_jax.sparsity import methods
from selfish_jax.training import parallel, steps
from selfish_jax.training import workdir as workdir_lib
from selfish_jax.training.preemption import PreemptionWatch
from selfish_jax.training.checkpoint import Checkpoints
from selfish_jax.training import metrics
from selfish_jax.training.metrics import MetricWriter

PyTree = Any


@dataclasses.dataclass
class HostState:
  """Loop state kept on the host and checkpointed as JSON."""
  epoch: int = 1  # the epoch in progress
  window: int = 0  # windows of this epoch already trained
  val_losses: list = dataclasses.field(default_factory=list)  # SGD-phase history
  best_val_loss: float = math.inf

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d['best_val_loss'] = None if math.isinf(self.best_val_loss) else self.best_val_loss
    return d

  @classmethod
  def from_json(cls, d: dict) -> 'HostState':
    d = dict(d)
    d['best_val_loss'] = math.inf if d['best_val_loss'] is None else d['best_val_loss']
    return cls(**d)


# Keys that may change when a run is resumed: they do not change its results.
RESUMABLE_CHANGES = frozenset({'data_dir', 'download', 'download_url', 'log_every',
                               'checkpoint_every_steps', 'num_devices'})


# Optimizers whose SGD phase carries no state: a run of one can continue another's.
FORKABLE_OPTIMIZERS = ('snt_asgd', 'asgd', 'sgd')


def check_forkable(source: dict, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless ``config`` may continue the run whose config is ``source``."""
  current = workdir_lib.as_saved(config)
  changed = sorted(k for k in set(source) | set(current)
                   if k not in RESUMABLE_CHANGES | {'optimizer', 'fork_from'}
                   and source.get(k) != current.get(k))
  if changed:
    raise config_lib.ConfigError(f'cannot fork from {config.fork_from}: its config differs in '
                                 f'{", ".join(changed)}')
  for optimizer in (source.get('optimizer'), config.optimizer):
    if optimizer not in FORKABLE_OPTIMIZERS:
      raise config_lib.ConfigError(f'cannot fork between optimizers other than '
                                   f'{FORKABLE_OPTIMIZERS}: {optimizer!r} has SGD-phase state')


def check_resumable(saved: dict, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError if ``config`` differs from a workdir's saved config in a key that matters."""
  current = workdir_lib.as_saved(config)
  changed = sorted(k for k in set(saved) | set(current)
                   if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
  if changed:
    details = ', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in changed)
    raise config_lib.ConfigError(f'the workdir holds a run with a different config ({details}); '
                                 'use a new workdir or the same settings')


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  return optim.make_optimizer(config.optimizer, config.lr, weight_decay=config.weight_decay,
                              clip_norm=config.clip if config.clip > 0 else None,
                              momentum=config.momentum)


def build_method(config: ml_collections.ConfigDict, steps_per_epoch: int) -> methods.Method:
  return methods.make_method(
      config.method, density=config.density, sparse_init=config.sparse_init,
      death_rate=config.death_rate, death_rate_final=config.death_rate_final,
      total_steps=config.num_epochs * steps_per_epoch, growth=config.growth,
      every_steps=config.update_every, end_fraction=config.update_end_fraction)


def create_train_state(config: ml_collections.ConfigDict, model: models.LanguageModel,
                       tx: optax.GradientTransformation, method: methods.Method,
                       key: jax.Array) -> steps.TrainState:
  """Initial parameters, masks (exact counts) and optimizer state."""
  params_key, mask_key = jax.random.split(key)
  carry = model.initial_carry(config.batch_size)
  params = models.init_params(model, params_key)
  # Not jitted as a whole (it runs once): the per-matrix selections are jitted
  # by shape, so one program is compiled per distinct matrix shape.
  masks = method.init_masks(mask_key, params)
  params = sparsity.apply_masks(params, masks)
  return steps.TrainState(step=jnp.int32(0), params=params, masks=masks,
                          opt_state=tx.init(params), carry=carry,
                          method_state=method.initial_state,
                          ever_active=jax.tree.map(jnp.copy, masks),
                          gradients=initial_gradients(method, params))


def initial_gradients(method: methods.Method, params: PyTree) -> PyTree:
  """The train state's gradient buffer: zeros for methods that grow by gradient, else None."""
  return jax.tree.map(jnp.zeros_like, params) if method.scores == 'gradient' else None


def growth_scores(method: methods.Method, state: steps.TrainState) -> PyTree:
  """What ``method`` grows by: the latest train step's gradient, the optimizer's
  momentum, or None."""
  if method.scores == 'gradient':
    return state.gradients
  if method.scores == 'momentum':
    return optim.momentum_of(state.opt_state)
  return None


def method_rates(method: methods.Method, step: jax.Array) -> dict[str, float]:
  """What the method's schedules say at ``step``: the removal fraction it
  really uses (``death_rate``) and, for gradual pruning, the target density."""
  rates = {}
  if method.removal_rate is not None:
    rates['death_rate'] = float(method.removal_rate(step))
  if method.density_schedule is not None:
    rates['target_density'] = float(method.density_schedule(step))
  return rates


def fork(config, state, tx, method, change_topology, topology_key, mask_fields, writer):
  """``(state, host)`` of ``config.fork_from``'s run where it switched averaging on,
  continued with this run's optimizer.

  The SGD phase of the forkable optimizers carries no state, so the fresh
  optimizer state is exact; an optimizer that averages switches on at once,
  and plain SGD, which would not have switched, gets the topology update the
  source skipped in that epoch (same key and scores as the loop would use: the
  switch checkpoint holds the last step's gradient for gradient growth).
  The source's metrics up to the fork are copied, so curves are complete.
  """
  source = config.fork_from
  source_config = workdir_lib.read_config(source)
  if source_config is None:
    raise config_lib.ConfigError(f'cannot fork from {source}: no config.json (not a run)')
  check_forkable(source_config, config)
  source_tx = optim.make_optimizer(source_config['optimizer'], config.lr)
  source_checkpoints = Checkpoints(source)
  restored = source_checkpoints.restore_switch(
      state.replace(opt_state=source_tx.init(state.params)))
  source_checkpoints.close()
  if restored is None:
    raise config_lib.ConfigError(f'cannot fork from {source}: it has not switched averaging on '
                                 '(no switch checkpoint yet)')
  state, host_json = restored
  host = HostState.from_json(host_json)
  state = state.replace(opt_state=tx.init(state.params))
  records = [r for r in metrics.read_records(source)
             if r['step'] <= int(state.step)]
  epoch = host.epoch - 1  # the switching epoch, finished
  if optim.can_average(state.opt_state):
    state = state.replace(opt_state=optim.start_averaging(state.opt_state))
  elif method.updates_at(int(state.step), epoch_end=True):
    before = jax.device_get(state.masks)
    state = change_topology(state, jax.random.fold_in(topology_key, epoch))
    records[-1] = {**records[-1], **mask_fields(state), 'topology_distance':
                   sparsity.topology_distance(before, jax.device_get(state.masks))}
  writer.truncate_after(-1)  # a fork interrupted before its first checkpoint starts over
  for record in records:
    writer.write(record)
  logging.info('Forked from %s at step %d (end of epoch %d) with optimizer %s.', source,
               int(state.step), epoch, config.optimizer)
  return state, host


def _perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, validates and tests as ``config`` says; resumes from ``workdir``.

  Every program is traced under ``config.matmul_precision``.

  Returns:
    The final record: best validation and test perplexity, and more.

  Raises:
    Preempted: SIGTERM arrived; the state of the step it was noticed at is saved.
  """
  config_lib.validate(config)
  with jax.default_matmul_precision(config.matmul_precision):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  corpus = load_corpus(config.dataset, config.data_dir, allow_download=config.download,
                       base_url=config.download_url or None)
  train_columns = batchify(corpus.train, config.batch_size)
  fixed_windows = batching.make_windows(train_columns, config.bptt)

  def epoch_windows(epoch: int) -> tuple[batching.Windows, np.ndarray]:
    """The epoch's training windows and per-window lr factors (drawn from the
    seed and the epoch under variable BPTT, so a resumed epoch gets the same)."""
    if not config.variable_bptt:
      return fixed_windows, np.ones(fixed_windows.num_windows, np.float32)
    return batching.make_variable_windows(train_columns, config.bptt, config.max_bptt_delta,
                                       np.random.default_rng([config.seed, epoch]))

  valid_windows = batching.make_windows(batchify(corpus.valid, config.eval_batch_size), config.bptt)
  test_batch_size = config.test_batch_size or config.eval_batch_size
  test_windows = batching.make_windows(batchify(corpus.test, test_batch_size), config.bptt)
  # Nominal: variable BPTT draws a few more (shorter) windows an epoch. The
  # method's schedules run over num_epochs x this many steps.
  steps_per_epoch = fixed_windows.num_windows
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch_divisible(mesh, batch_size=config.batch_size,
                                 eval_batch_size=config.eval_batch_size,
                                 gradient_groups=config.gradient_groups)
  replicated = parallel.replicated(mesh)
  batch_sharded = parallel.batch_sharding(mesh)
  valid_windows = parallel.put(valid_windows, parallel.batch_sharding(mesh, batch_axis=1))
  # A test batch the devices do not divide (the official scripts' batch 1) is
  # evaluated whole on every device.
  test_windows = parallel.put(test_windows, parallel.batch_sharding(mesh, batch_axis=1)
                              if test_batch_size % mesh.devices.size == 0 else replicated)

  model = models.build_model(config, corpus.vocab_size, mesh.devices.size)
  tx = build_optimizer(config)
  root = jax.random.key(config.seed)
  # (A fourth key once drew the dropout of a separate gradient pass; the split
  # stays 4-way so the other keys, and every result, stay the same.)
  init_key, dropout_key, topology_key, _ = jax.random.split(root, 4)
  method = build_method(config, steps_per_epoch)
  state = create_train_state(config, model, tx, method, init_key)
  if optim.can_average(state.opt_state) and config.asgd_start_epoch == 1:
    state = state.replace(opt_state=optim.start_averaging(state.opt_state))
  state_sharding = parallel.train_state_sharding(mesh, state)
  state = jax.device_put(state, state_sharding)
  initial_carry = lambda: parallel.put(model.initial_carry(config.batch_size), batch_sharded)

  grad_fn = steps.make_grad_fn(model, mesh, config.gradient_groups)
  train_step = jax.jit(steps.make_train_step(grad_fn, tx), donate_argnums=0,
                       in_shardings=(state_sharding, batch_sharded, replicated, replicated),
                       out_shardings=(state_sharding, replicated))
  evaluate_split = jax.jit(steps.make_evaluate(model, config.eval_batch_size))
  evaluate = lambda params, windows: float(evaluate_split(params, windows))
  evaluate_test = (evaluate_split if test_batch_size == config.eval_batch_size
                   else jax.jit(steps.make_evaluate(model, test_batch_size)))
  eval_params = jax.jit(optim.averaged_params)  # (opt_state, params, masks)
  # One program over all matrices, donating the params so XLA can update them in place.
  update_topology = jax.jit(method.update, donate_argnums=0) if method.update else None
  union = jax.jit(sparsity.union_masks)

  def change_topology(state, key):
    """The method's topology update, growing by what the latest step left (its
    gradient, or the optimizer's momentum) where the method says so."""
    params, masks, method_state = update_topology(state.params, state.masks, state.method_state,
                                                  key, state.step, growth_scores(method, state))
    return state.replace(params=params, masks=masks, method_state=method_state,
                         ever_active=union(state.ever_active, masks))

  def mask_fields(state) -> dict:
    """What an epoch record says about the masks."""
    summary = sparsity.summarize(state.masks, model.gate_layout)
    itop = sparsity.itop_rate(state.ever_active)
    return {'density': summary['density'], 'gate_density': summary['gate_density'],
            'itop_rate': itop['total'], 'itop_rate_per_matrix': itop['per_matrix']}

  workdir_lib.open_workdir(workdir, workdir_lib.as_saved(config),
                           lambda saved: check_resumable(saved, config))
  checkpoints = Checkpoints(workdir)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  host = HostState()
  restored = checkpoints.restore_latest(state)
  if restored is None and config.fork_from:
    state, host = fork(config, state, tx, method, change_topology, topology_key, mask_fields,
                       writer)
    checkpoints.save_latest(int(state.step), state, host.to_json())
  elif restored is not None:
    state, host_json = restored
    host = HostState.from_json(host_json)
    writer.truncate_after(int(state.step))
    logging.info('Resumed from %s at step %d (epoch %d, window %d).', workdir,
                 int(state.step), host.epoch, host.window)
  else:
    summary = sparsity.summarize(state.masks, model.gate_layout)
    logging.info('Method %s, optimizer %s: %d of %d weights active (density %.4f of the '
                 'masked matrices); active per matrix %s', method.name, config.optimizer,
                 sparsity.parameter_count(state.params, state.masks),
                 sum(p.size for p in jax.tree.leaves(state.params)), summary['density'],
                 summary['active'])

  saved_step = checkpoints.latest_step()
  unchecked = []  # (step, loss on the device) not yet checked for divergence

  def diverged(what: str, value: float, step: int) -> TrainingDiverged:
    kept = (f'the checkpoint of step {saved_step} and the best weights in {workdir} are kept '
            'unchanged' if saved_step is not None else 'no checkpoint had been written')
    return TrainingDiverged(f'training diverged: {what} is {value} at step {step}; {kept} '
                            '(a lower lr or a stronger clip may help)')

  def check_losses():
    """Stops the run at the first NaN or inf training loss, before anything of it is saved."""
    values = np.asarray(jax.device_get([loss for _, loss in unchecked]))
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      raise diverged('the training loss', values[bad[0]], unchecked[bad[0]][0])
    unchecked.clear()

  def save_latest():
    nonlocal saved_step
    check_losses()
    checkpoints.save_latest(int(state.step), state, host.to_json())
    saved_step = int(state.step)

  step = int(state.step)  # kept on the host from here on: no device sync per step
  # SIGTERM (TPU maintenance, scancel, eviction): save at a step and stop.
  with PreemptionWatch() as preemption:
    while host.epoch <= config.num_epochs:
      epoch = host.epoch
      epoch_start = time.time()
      if host.window == 0:
        state = state.replace(carry=initial_carry())
      train_windows, lr_factors = epoch_windows(epoch)
      window_tokens = train_windows.weights.sum(axis=(1, 2)).astype(int)  # real tokens a window
      epoch_steps = train_windows.num_windows
      if config.max_steps_per_epoch:
        epoch_steps = min(epoch_steps, config.max_steps_per_epoch)
      losses, interval_start, interval_steps, interval_tokens = [], time.time(), 0, 0
      epoch_tokens = 0
      for index in range(host.window, epoch_steps):
        window = parallel.put(train_windows[index], batch_sharded)
        state, loss = train_step(state, window, dropout_key, lr_factors[index])
        step += 1
        interval_tokens += int(window_tokens[index])
        epoch_tokens += int(window_tokens[index])
        if method.updates_at(step, epoch_end=False):  # RigL, GMP: every ΔT steps
          state = change_topology(state, jax.random.fold_in(topology_key, state.step))
        losses.append(loss)
        unchecked.append((step, loss))
        interval_steps += 1
        host.window = index + 1
        if host.window % config.log_every == 0 or host.window == epoch_steps:
          check_losses()
          mean_loss = float(jnp.mean(jnp.stack(losses)))
          elapsed = time.time() - interval_start
          record = {'kind': metrics.TRAIN, 'step': int(state.step), 'epoch': epoch,
                    'loss': mean_loss,
                    'ppl': _perplexity(mean_loss), 'ms_per_step': 1000 * elapsed / interval_steps,
                    'tokens_per_s': interval_tokens / elapsed}
          writer.write(record)
          logging.info('| epoch %3d | %5d/%5d windows | loss %5.2f | ppl %8.2f | '
                       '%6.1f ms/step | %6.0f tokens/s', epoch, host.window, epoch_steps,
                       mean_loss, record['ppl'], record['ms_per_step'], record['tokens_per_s'])
          losses, interval_start, interval_steps, interval_tokens = [], time.time(), 0, 0
        if (config.checkpoint_every_steps and host.window % config.checkpoint_every_steps == 0
            and host.window < epoch_steps):
          save_latest()
        if preemption.reached(step):
          save_latest()
          writer.close()
          checkpoints.close()
          raise Preempted(f'preempted: the state of step {step} (epoch {epoch}, window '
                          f'{host.window} of {epoch_steps}) is saved in {workdir}; run the same '
                          'command to resume')
      train_time = time.time() - epoch_start

      averaging = bool(optim.is_averaging(state.opt_state))
      weights = eval_params(state.opt_state, state.params, state.masks)
      val_loss = evaluate(weights, valid_windows)
      if not math.isfinite(val_loss):
        raise diverged('the validation loss', val_loss, int(state.step))
      improved = val_loss < host.best_val_loss
      if improved:
        host.best_val_loss = val_loss
        checkpoints.save_best(epoch, weights)
      switched = False
      if not averaging and optim.can_average(state.opt_state):
        if optim.averaging_starts(epoch, host.val_losses, val_loss, config.nonmono,
                                  config.asgd_start_epoch):
          state = state.replace(opt_state=optim.start_averaging(state.opt_state))
          switched = True
          logging.info('Switching to averaging (%s) after epoch %d.', config.optimizer, epoch)
      if not averaging:
        host.val_losses.append(val_loss)
      moved = {}
      if method.updates_at(step, epoch_end=True) and not switched:  # (fork() repeats this)
        before = jax.device_get(state.masks)
        state = change_topology(state, jax.random.fold_in(topology_key, epoch))
        moved = sparsity.topology_distance(before, jax.device_get(state.masks))
      restarted = averaging and epoch in config.asgd_restart_epochs
      if restarted:
        state = state.replace(opt_state=optim.restart_averaging(state.opt_state))
        logging.info('Averaging starts over after epoch %d.', epoch)
      fields = mask_fields(state)
      record = {'kind': metrics.EPOCH, 'step': int(state.step), 'epoch': epoch,
                'val_loss': val_loss,
                'val_ppl': _perplexity(val_loss),
                'optimizer': 'asgd' if averaging else 'sgd', **method_rates(method, state.step),
                'epoch_time_s': time.time() - epoch_start,
                # Of this session's part of the epoch (all of it unless resumed mid-epoch).
                'train_tokens_per_s': epoch_tokens / max(train_time, 1e-9),
                **fields, 'topology_distance': moved,  # per matrix, this epoch's update
                'averaging_restarted': restarted}
      writer.write(record)
      logging.info('| end of epoch %3d | %6.1fs | valid loss %5.2f | valid ppl %8.2f | %s | '
                   'density %.4f | ITOP %.4f%s%s', epoch, record['epoch_time_s'], val_loss,
                   record['val_ppl'], record['optimizer'], fields['density'], fields['itop_rate'],
                   ''.join(f' | {k.replace("_", " ")} {v:.4f}'
                           for k, v in method_rates(method, state.step).items()),
                   ' | best' if improved else '')
      for name, gates in fields['gate_density'].items():
        logging.info('    gate density %s: %s', name,
                     ' '.join(f'{g}={d:.3f}' for g, d in gates.items()))
      host.epoch, host.window = epoch + 1, 0
      save_latest()
      if switched:
        checkpoints.save_switch(int(state.step), state, host.to_json())

  best = checkpoints.restore_best(state.params)
  test_loss = float(evaluate_test(best if best is not None else state.params, test_windows))
  dense_forward = flops.forward_flops_per_token(state.params, sparsity.dense_masks(state.params),
                                                model.weight_uses)
  sparse_forward = flops.forward_flops_per_token(state.params, state.masks, model.weight_uses)
  final = {'kind': metrics.FINAL, 'step': int(state.step), 'test_loss': test_loss,
           'test_ppl': _perplexity(test_loss),
           'best_val_loss': host.best_val_loss, 'best_val_ppl': _perplexity(host.best_val_loss),
           'density': sparsity.overall_density(state.masks),
           'params': sparsity.parameter_count(state.params, state.masks),
           'train_flops_relative': flops.train_flops_relative(
               method, sparse_forward, dense_forward, config.num_epochs * steps_per_epoch)}
  writer.write(final)
  logging.info('| end of training | test loss %5.2f | test ppl %8.2f | best valid ppl %8.2f',
               test_loss, final['test_ppl'], final['best_val_ppl'])
  writer.close()
  checkpoints.close()
  return final
