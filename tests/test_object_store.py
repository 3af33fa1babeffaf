"""A workdir and a data folder on an object store (``gs://`` on a fake server,
see ``fake_gcs``): what cannot append or rename there still keeps every line.

The whole run (train, preempt, resume) on ``gs://`` is in test_preemption.py.
"""

import gzip
import hashlib
import json
import os
import struct
import urllib.parse

from absl import logging
from etils import epath
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import fake_gcs
from experiments import report
from experiments.cell_log import cell_log
from experiments.configs import ptb_lstm_small
from selfish_jax import storage
from selfish_jax.data import download, load_corpus
from selfish_jax.errors import DataError, WorkdirError
from selfish_jax.training import metrics, workdir as workdir_lib


def _gs(tmp_path, name=''):
  return f'gs://{fake_gcs.BUCKET}/{tmp_path.name}' + (f'/{name}' if name else '')


def test_metrics_keep_every_record_and_a_resume_truncates(gcs, tmp_path):
  workdir = _gs(tmp_path, 'run')
  writer = metrics.MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write({'step': step, 'loss': float(step)})
  # gcsfs has no append: opened with 'a', each write replaced the file.
  assert [r['step'] for r in gcs.metrics(f'{tmp_path.name}/run')] == [1, 2, 3]

  resumed = metrics.MetricWriter(workdir)  # a run restored at step 2
  resumed.truncate_after(2)
  resumed.write({'step': 3, 'loss': 9.0})
  resumed.write({'step': 4, 'test_ppl': 50.0})
  assert [(r['step'], r.get('loss')) for r in gcs.metrics(f'{tmp_path.name}/run')] == [
      (1, 1.0), (2, 2.0), (3, 9.0), (4, None)]
  assert metrics.final_record(workdir)['test_ppl'] == 50.0  # the reader, through gcsfs
  assert not any(name.endswith('.tmp') or '.tmp-' in name
                 for name in gcs.names(tmp_path.name + '/'))


def _scalars(event_file: bytes) -> dict[str, list[tuple[int, float]]]:
  """The scalars of a TensorBoard event file (TFRecords of Event protos)."""
  scalars, offset = {}, 0
  while offset < len(event_file):
    (length,) = struct.unpack('<Q', event_file[offset:offset + 8])
    event = event_pb2.Event.FromString(event_file[offset + 12:offset + 12 + length])
    offset += 12 + length + 4  # length, its CRC, the event, its CRC
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_event_files_reach_the_bucket(gcs, tmp_path):
  writer = metrics.MetricWriter(_gs(tmp_path, 'run'), upload_every_s=0)
  writer.write({'step': 1, 'loss': 1.0})
  uploaded = gcs.names(f'{tmp_path.name}/run/tensorboard/')
  assert len(uploaded) == 1  # during the run, not only at its end
  writer.write({'step': 2, 'loss': 2.0, 'gate_density': {'i': 0.5}})
  local = writer._tb_upload[0]  # pylint: disable=protected-access
  writer.close()
  assert not os.path.exists(local)
  event_file = epath.Path(f'gs://{fake_gcs.BUCKET}/{uploaded[0]}').read_bytes()
  assert _scalars(event_file) == {'loss': [(1, 1.0), (2, 2.0)], 'gate_density/i': [(2, 0.5)]}


def test_a_file_on_disk_is_replaced_whole_or_not_at_all(tmp_path):
  path = tmp_path / 'run' / 'config.json'
  storage.write_atomically(path, '{"lr": 20}')
  assert path.read_text() == '{"lr": 20}'
  assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as open() makes it, not private
  with pytest.raises(TypeError):
    storage.write_atomically(path, ['not', 'text'])  # fails while writing
  assert path.read_text() == '{"lr": 20}' and os.listdir(path.parent) == ['config.json']


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_config_is_written_whole_without_a_temporary_object(gcs, tmp_path):
  workdir = _gs(tmp_path, 'run')
  workdir_lib.open_workdir(workdir, {'lr': 20.0}, check=lambda saved, config: None)
  assert workdir_lib.read_config(workdir) == {'lr': 20.0}
  assert gcs.names(tmp_path.name + '/') == [f'{tmp_path.name}/run/config.json']
  seen = []
  record = lambda saved, config: seen.append(saved)
  workdir_lib.open_workdir(workdir, {'lr': 40.0}, check=record)  # a resume checks it
  assert seen == [{'lr': 20.0}] and workdir_lib.read_config(workdir) == {'lr': 20.0}
  with pytest.raises(WorkdirError, match=r'^cannot write gs://nobucket/run/config.json '
                     r'\(FileNotFoundError: .*\): check that the folder or bucket exists'):
    workdir_lib.open_workdir('gs://nobucket/run', {'lr': 20.0}, check=record)


def test_a_sweep_on_gs_collects_reports_and_logs_its_cells(gcs, tmp_path):
  sweep = _gs(tmp_path)
  for name, test_ppl in (('selfish-snt_asgd-seed1', 80.0), ('set-snt_asgd-seed1', 90.0)):
    records = [{'step': i + 1, 'epoch': i + 1, 'val_loss': v, 'val_ppl': 2.0 ** v}
               for i, v in enumerate([6.0, 5.0, 4.8])]
    records.append({'step': 4, 'test_ppl': test_ppl, 'best_val_ppl': 2.0 ** 4.8,
                    'density': 0.33, 'params': 100, 'train_flops_relative': 0.4})
    epath.Path(sweep, name, 'metrics.jsonl').write_text(
        ''.join(json.dumps(r) + '\n' for r in records))
  base = ptb_lstm_small.get_config()
  rows = report.collect(base, sweep, ['selfish', 'set'], ['sgd', 'snt_asgd'], [1], {})
  # Each sgd cell is its snt_asgd twin (the trigger never fired in 3 epochs).
  assert [(r['method'], r['optimizer'], r['test_ppl'][0]) for r in rows] == [
      ('selfish', 'sgd', 80.0), ('selfish', 'snt_asgd', 80.0),
      ('set', 'sgd', 90.0), ('set', 'snt_asgd', 90.0)]
  table = report.write_report(rows, sweep)
  assert gcs.read(f'{tmp_path.name}/results.md') == table
  assert '| set | snt_asgd | 100 | 0.330 |' in table
  assert json.loads(gcs.read(f'{tmp_path.name}/results.json')) == json.loads(json.dumps(rows))
  assert epath.Path(sweep, 'val_ppl.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  cell = _gs(tmp_path, 'selfish-snt_asgd-seed1')
  for line in ('first session', 'resumed session'):
    with cell_log(cell, show=False):
      logging.warning('%s', line)
  log = gcs.read(f'{tmp_path.name}/selfish-snt_asgd-seed1/train.log')
  assert log.index('first session') < log.index('resumed session')


def test_a_corpus_folder_in_a_bucket_reads_as_on_disk(gcs, text_corpus_dir, tmp_path):
  folder = _gs(tmp_path, 'corpus')
  for split in ('train', 'valid', 'test'):
    with open(os.path.join(text_corpus_dir, f'{split}.txt'), 'rb') as f:
      text = f.read()
    if split == 'valid':
      epath.Path(folder, 'valid.txt.gz').write_bytes(gzip.compress(text))
    else:
      epath.Path(folder, f'{split}.txt').write_bytes(text)
  from_bucket, on_disk = load_corpus('text', folder), load_corpus('text', text_corpus_dir)
  assert from_bucket.vocab == on_disk.vocab
  for split in ('train', 'valid', 'test'):
    np.testing.assert_array_equal(from_bucket.split(split), on_disk.split(split))


def test_a_download_lands_in_a_bucket_only_when_verified(gcs, tmp_path):
  text = 'the cat sat\n'
  served = f'{tmp_path.name}/served/train.txt'
  epath.Path(f'gs://{fake_gcs.BUCKET}/{served}').write_text(text)
  url = (f'{gcs.url}/download/storage/v1/b/{fake_gcs.BUCKET}/o/'
         f'{urllib.parse.quote(served, safe="")}?alt=media')
  cached = f'{tmp_path.name}/cache/ptb/train.txt'
  with pytest.raises(DataError, match='checksum mismatch for download'):
    download.fetch(url, f'gs://{fake_gcs.BUCKET}/{cached}', sha256='0' * 64)
  assert gcs.names(f'{tmp_path.name}/cache/') == []
  download.fetch(url, f'gs://{fake_gcs.BUCKET}/{cached}',
                 sha256=hashlib.sha256(text.encode()).hexdigest())
  assert gcs.read(cached) == text
