"""What a run's terminal shows: its own lines, not other libraries' INFO chatter."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, data_dir, *flags):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.main', '--config=experiments/configs/ptb_lstm_small.py',
       f'--workdir={workdir}', '--config.dataset=text', f'--config.data_dir={data_dir}',
       '--config.download=False', '--config.emsize=16', '--config.nhid=16',
       '--config.num_epochs=1', '--config.max_steps_per_epoch=20', '--config.log_every=10',
       *flags], cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True,
      text=True, timeout=300)


def test_a_run_prints_its_own_lines_only(text_corpus_dir, tmp_path):
  done = _run(tmp_path / 'quiet', text_corpus_dir)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stderr.strip().splitlines()
  assert not [l for l in lines if 'checkpoint' in l.split(']')[0]], lines  # orbax's modules
  assert any('| epoch   1 |    10/   20 steps |' in l and 'epoch left' in l for l in lines)
  assert any('| end of epoch   1 |' in l for l in lines)
  assert any('| end of training | test loss' in l for l in lines)
  assert all(re.search(r' (language_modelling|loop|core).py:', l.split(']')[0])
             for l in lines if l[:1] == 'I'), lines
  assert any('Start: lstm language model on text' in l and 'weights active' in l for l in lines)
  # Asked for, the libraries' INFO lines are there.
  done = _run(tmp_path / 'verbose', text_corpus_dir, '--library_logs')
  assert done.returncode == 0, done.stderr[-2000:]
  assert any('checkpoint_manager.py' in l for l in done.stderr.splitlines())


def test_compiled_programs_are_kept_under_the_cache_home_unless_turned_off(text_corpus_dir,
                                                                          tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(PYTHONPATH=ROOT, XDG_CACHE_HOME=str(tmp_path / 'cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  args = [sys.executable, '-m', 'experiments.main',
          '--config=experiments/configs/ptb_lstm_small.py', '--config.dataset=text',
          f'--config.data_dir={text_corpus_dir}', '--config.download=False',
          '--config.emsize=8', '--config.nhid=8', '--config.num_epochs=1',
          '--config.max_steps_per_epoch=2']
  done = subprocess.run([*args, f'--workdir={tmp_path / "a"}', '--compilation_cache_dir='],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert not (tmp_path / 'cache').exists()  # turned off
  done = subprocess.run([*args, f'--workdir={tmp_path / "b"}'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert len(os.listdir(tmp_path / 'cache' / 'selfish_jax' / 'jax_cache')) >= 3  # step, eval, ...
