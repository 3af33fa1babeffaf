"""The comparison runner's sharing of identical runs (no training here)."""

import json

from experiments import report, sweep
from experiments.configs import ptb_lstm_small


def _fake_run(workdir, name, val_losses, test_ppl):
  path = workdir / name
  path.mkdir()
  records = [{'epoch': i + 1, 'val_loss': v, 'val_ppl': 2.0 ** v, 'optimizer': 'sgd'}
             for i, v in enumerate(val_losses)]
  records.append({'test_ppl': test_ppl, 'best_val_ppl': 2.0 ** min(val_losses),
                  'density': 0.33, 'params': 100, 'train_flops_relative': 0.4})
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


def _rows(base, workdir, methods, share=True):
  return {(r['method'], r['optimizer']): r for r in report.collect(
      base, str(workdir), methods, ['sgd', 'snt_asgd'], [1], {'momentum': 2.0}, share)}


def test_sgd_cell_shares_the_snt_asgd_run_only_if_the_trigger_never_fired(tmp_path):
  base = ptb_lstm_small.get_config()  # nonmono = 5
  _fake_run(tmp_path, 'selfish-snt_asgd-seed1', [6.0, 5.0, 4.8, 4.7, 4.6, 4.5, 4.4], 80.0)
  # Epoch 7 is worse than epoch 1: the trigger would have fired, whatever the records say.
  _fake_run(tmp_path, 'set-snt_asgd-seed1', [4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0], 90.0)
  assert sweep.identical_twin(base, str(tmp_path), 'selfish', 'sgd', 1, {}) == (
      'selfish-snt_asgd-seed1')
  assert sweep.identical_twin(base, str(tmp_path), 'set', 'sgd', 1, {}) is None
  # asgd, too, takes snt_asgd's steps until averaging starts.
  assert sweep.identical_twin(base, str(tmp_path), 'selfish', 'asgd', 1, {}) == (
      'selfish-snt_asgd-seed1')
  rows = _rows(base, tmp_path, ['selfish', 'set'])
  assert rows['selfish', 'sgd']['shared_with'] == ['selfish-snt_asgd-seed1']
  assert rows['selfish', 'sgd']['test_ppl'] == rows['selfish', 'snt_asgd']['test_ppl']
  assert ('set', 'sgd') not in rows and rows['set', 'snt_asgd']['shared_with'] == []
  assert ('selfish', 'sgd') not in _rows(base, tmp_path, ['selfish'], share=False)
  # A shared cell is not trained again: run_cell returns the twin's result.
  assert sweep.run_cell(base, str(tmp_path), 'selfish', 'sgd', 1, {})['test_ppl'] == 80.0
  report.write_report(list(_rows(base, tmp_path, ['selfish']).values()), str(tmp_path))
  assert '| selfish | sgd [= selfish-snt_asgd-seed1] |' in (tmp_path / 'results.md').read_text()


def test_cells_with_equal_resolved_configs_share_regardless_of_the_trigger(tmp_path):
  base = ptb_lstm_small.get_config()
  # SNFS runs SGD momentum under both names: the same config, one run.
  _fake_run(tmp_path, 'snfs-sgd-seed1', [4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0], 95.0)
  lrs = {'momentum': 2.0}
  assert sweep.identical_twin(base, str(tmp_path), 'snfs', 'snt_asgd', 1, lrs) == (
      'snfs-sgd-seed1')
  assert sweep.identical_twin(base, str(tmp_path), 'snfs', 'snt_asgd', 1,
                                {'momentum': 2.0, 'snt_asgd': 30.0}) == 'snfs-sgd-seed1'
  assert sweep.identical_twin(base, str(tmp_path), 'dense', 'snt_asgd', 1, lrs) is None


def test_a_fixed_switch_within_the_run_means_averaging_whatever_the_trigger(tmp_path):
  base = ptb_lstm_small.get_config()
  base.asgd_start_epoch = 8
  improving = [6.0 - 0.1 * i for i in range(15)]  # the trigger never fires
  _fake_run(tmp_path, 'selfish-sgd-seed1', improving, 80.0)
  # asgd averages from epoch 8 on: it is not the sgd run, though their configs
  # differ only by the optimizer and the trigger stays silent.
  assert sweep.identical_twin(base, str(tmp_path), 'selfish', 'asgd', 1, {}) is None
  assert sweep.identical_twin(base, str(tmp_path), 'selfish', 'snt_asgd', 1, {}) is None
  _fake_run(tmp_path, 'set-sgd-seed1', improving[:7], 90.0)  # ended before the switch
  assert sweep.identical_twin(base, str(tmp_path), 'set', 'asgd', 1, {}) == 'set-sgd-seed1'


def test_continuations_fork_from_the_snt_asgd_run_at_its_switch(tmp_path, monkeypatch):
  base = ptb_lstm_small.get_config()
  base.asgd_start_epoch = 8
  (tmp_path / 'selfish-snt_asgd-seed1' / 'switch').mkdir(parents=True)
  trained = {}
  monkeypatch.setattr(sweep.language_modelling, 'train_and_evaluate',
                      lambda config, path, start: trained.setdefault(path, start) and {})
  for optimizer in ('sgd', 'asgd', 'momentum'):
    sweep.run_cell(base, str(tmp_path), 'selfish', optimizer, 1, {})
  forks = {path.rsplit('/', 1)[1]: start and start.source for path, start in trained.items()}
  source = str(tmp_path / 'selfish-snt_asgd-seed1')
  assert forks == {'selfish-sgd-seed1': source, 'selfish-asgd-seed1': source,
                   'selfish-momentum-seed1': None}
  trained.clear()
  sweep.run_cell(base, str(tmp_path), 'set', 'sgd', 1, {})  # no switched twin: from scratch
  assert list(trained.values()) == [None]


def test_sweep_status_says_what_is_done_running_and_left():
  cells = [('dense', 'snt_asgd', 1), ('selfish', 'snt_asgd', 1), ('selfish', 'sgd', 1)]
  assert sweep.sweep_status(cells, {cells[0]: {'test_ppl': 119.944}}, cells[1]) == (
      'sweep: 1/3 cells done (test ppl: dense/snt_asgd/1 119.94); running selfish/snt_asgd/1; '
      '1 left')
  assert sweep.sweep_status(cells, {}, None) == 'sweep: 0/3 cells done; 3 left'
