"""Corpus loading, checksums, downloads, batching and the tfds builders."""

import gzip
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest

from selfish_jax.data import batching, corpus
from selfish_jax.data.corpus import load_corpus
from selfish_jax.errors import DataError


@pytest.fixture(scope='module')
def ptb(shared_data_dir):
  return load_corpus('ptb', shared_data_dir, allow_download=False)


def test_ptb_token_counts_match_readme(ptb):
  assert ptb.vocab_size == 10_000
  assert (len(ptb.train), len(ptb.valid), len(ptb.test)) == (929_589, 73_760, 82_430)
  assert ptb.vocab[ptb.train[0]] == 'aer'  # first word of ptb.train.txt
  assert ptb.vocab[ptb.train[-1]] == corpus.EOS


def test_wikitext2_token_counts_match_readme(shared_data_dir):
  wt2 = load_corpus('wikitext2', shared_data_dir, allow_download=False)
  assert wt2.vocab_size == 33_278
  assert (len(wt2.train), len(wt2.valid), len(wt2.test)) == (2_088_628, 217_646, 245_569)


def test_tokenize_is_split_plus_eos_per_line():
  assert corpus.tokenize(' a b \n\n c\n') == ['a', 'b', '<eos>', '<eos>', 'c', '<eos>']


def test_batchify_and_windows_match_reference_semantics():
  tokens = np.arange(103, dtype=np.int32)
  columns = batching.batchify(tokens, 4)  # 25 per column, 3 dropped
  assert columns.shape == (4, 25)
  np.testing.assert_array_equal(columns[1], np.arange(25, 50))
  # range(0, 25 - 1, 10) -> windows at 0, 10, 20; the last has 4 steps.
  assert batching.num_windows(columns, 10) == 3
  windows = list(batching.bptt_windows(columns, 10))
  assert [w[1].shape[1] for w in windows] == [10, 10, 4]
  x, y = windows[2][1], windows[2][2]
  np.testing.assert_array_equal(x[0], np.arange(20, 24))
  np.testing.assert_array_equal(y[0], np.arange(21, 25))


def _write_split_files(directory, texts, gz=False):
  os.makedirs(directory, exist_ok=True)
  for split, text in texts.items():
    path = os.path.join(directory, f'{split}.txt' + ('.gz' if gz else ''))
    opener = gzip.open if gz else open
    with opener(path, 'wt', encoding='utf-8') as f:
      f.write(text)


def test_checksum_mismatch_is_a_clear_error(tmp_path):
  _write_split_files(tmp_path / 'ptb', {'train': 'not ptb\n', 'valid': 'x\n', 'test': 'y\n'})
  with pytest.raises(DataError, match='checksum mismatch.*train.txt'):
    load_corpus('ptb', str(tmp_path), allow_download=False)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
  (tmp_path / 'ptb').mkdir()
  (tmp_path / 'ptb' / 'train.txt.gz').write_bytes(b'\x1f\x8b garbage')
  with pytest.raises(DataError, match='cannot read data file'):
    load_corpus('ptb', str(tmp_path), allow_download=False)


def test_missing_file_without_download_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match='missing data file: no train.txt'):
    load_corpus('ptb', str(tmp_path), allow_download=False)


def test_unknown_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match="unknown dataset 'ptb2'"):
    load_corpus('ptb2', str(tmp_path))


def test_own_text_corpus_is_read_from_its_folder(tmp_path):
  _write_split_files(tmp_path, {'train': 'a b a\nc\n', 'valid': 'a c\n'}, gz=True)
  with pytest.raises(DataError, match='missing data file: no test.txt or test.txt.gz in'):
    load_corpus('text', str(tmp_path))
  _write_split_files(tmp_path, {'test': 'b a\n'})
  own = load_corpus('text', str(tmp_path))
  assert own.vocab == ('a', 'b', '<eos>', 'c')
  np.testing.assert_array_equal(own.train, [0, 1, 0, 2, 3, 2])
  np.testing.assert_array_equal(own.test, [1, 0, 2])


@pytest.fixture
def http_server(tmp_path):
  """Serves ``tmp_path/served`` on 127.0.0.1; yields (folder, base url)."""
  served = tmp_path / 'served'
  served.mkdir()

  class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(served), **kwargs)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield served, f'http://127.0.0.1:{server.server_address[1]}'
  server.shutdown()
  server.server_close()


def test_download_verifies_and_caches(shared_data_dir, tmp_path, http_server):
  served, url = http_server
  for split in corpus.SPLITS:
    with gzip.open(os.path.join(shared_data_dir, 'ptb', f'{split}.txt.gz'), 'rb') as f:
      (served / f'{split}.txt').write_bytes(f.read())
  cache = tmp_path / 'cache'
  downloaded = load_corpus('ptb', str(cache), base_url=url)
  assert len(downloaded.train) == 929_589
  for split in corpus.SPLITS:
    data = (cache / 'ptb' / f'{split}.txt').read_bytes()
    assert hashlib.sha256(data).hexdigest() == corpus.KNOWN_CORPORA['ptb'].splits[split].sha256
  # A second load reads the cache: the server is not needed any more.
  for split in corpus.SPLITS:
    (served / f'{split}.txt').unlink()
  assert len(load_corpus('ptb', str(cache), base_url=url).test) == 82_430


def test_download_with_bad_checksum_leaves_nothing_behind(tmp_path, http_server):
  served, url = http_server
  (served / 'train.txt').write_text('tampered\n')
  cache = tmp_path / 'cache'
  with pytest.raises(DataError, match='checksum mismatch for download'):
    load_corpus('ptb', str(cache), base_url=url)
  # The checksum is checked before anything is written: no file, no temporary
  # file, not even the folder.
  assert not (cache / 'ptb').exists()


def test_download_failure_is_a_clear_error(tmp_path, http_server):
  _, url = http_server  # serves nothing: 404
  missing = tmp_path / 'nonexistent'
  with pytest.raises(DataError) as error:
    load_corpus('ptb', str(missing), base_url=url)
  # One message: where the file was looked for, and that fetching it failed (and why).
  assert str(error.value) == (
      f'missing data file: no train.txt or train.txt.gz in {missing}/ptb, and fetching it '
      f'failed: download of {url}/train.txt failed: HTTP Error 404: File not found')


def test_tfds_builder_gives_the_same_corpus(shared_data_dir, tmp_path, ptb):
  from selfish_jax.data.tfds_builders import Ptb, corpus_from_data_sources
  builder = Ptb(data_dir=str(tmp_path / 'tfds'), file_format='array_record',
                source_dir=os.path.join(shared_data_dir, 'ptb'))
  builder.download_and_prepare()
  assert builder.name == 'ptb'
  sources = builder.as_data_source()
  assert len(sources['train']) == 42_068  # lines
  rebuilt = corpus_from_data_sources(sources)
  assert rebuilt.vocab == ptb.vocab
  np.testing.assert_array_equal(rebuilt.train, ptb.train)
  np.testing.assert_array_equal(rebuilt.test, ptb.test)


def test_variable_bptt_windows_cover_the_stream_like_awd_lstm():
  columns = batching.batchify(np.arange(4 * 2001, dtype=np.int32), 4)  # 2001 per column
  windows, lr_factors = batching.make_variable_windows(columns, 20, 5, np.random.default_rng(0))
  lengths = windows.weights[:, 0].sum(axis=1).astype(int)
  assert windows.inputs.shape[1:] == (4, 25)  # padded to bptt + max_delta
  assert lengths.sum() == 2000  # every target exactly once, in order
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  for index in (0, 7, len(lengths) - 1):
    length, start = lengths[index], starts[index]
    np.testing.assert_array_equal(windows.inputs[index, 2, :length],
                                  columns[2, start:start + length])
    np.testing.assert_array_equal(windows.targets[index, 2, :length],
                                  columns[2, start + 1:start + 1 + length])
    assert not np.any(windows.weights[index, :, length:])
  assert 5 <= lengths[:-1].min() and lengths.max() <= 25
  # Mostly N(20, 5), sometimes N(10, 5); the lr factor is the drawn length over bptt.
  np.testing.assert_allclose(lr_factors[:-1], lengths[:-1] / 20)
  assert 17 < lengths.mean() < 20 and np.mean(lengths < 12) < 0.15
  again, _ = batching.make_variable_windows(columns, 20, 5, np.random.default_rng(0))
  np.testing.assert_array_equal(again.inputs, windows.inputs)
