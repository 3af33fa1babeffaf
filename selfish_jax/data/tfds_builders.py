"""``tensorflow_datasets`` builders ``ptb`` and ``wikitext2`` (no TensorFlow needed).

Each example is one line of the corpus: ``{'index': line number, 'text': line}``,
stored in order (shuffling disabled). Prepare with ``file_format='array_record'``
and read with ``as_data_source()``; :func:`corpus_from_data_sources` turns the
three splits back into a :class:`~selfish_jax.data.corpus.Corpus` identical to
:func:`~selfish_jax.data.corpus.load_corpus`'s.

    builder = Ptb(data_dir='~/tensorflow_datasets', file_format='array_record',
                  source_dir='../shared/data/ptb')   # or omit it to download
    builder.download_and_prepare()
    corpus = corpus_from_data_sources(builder.as_data_source())
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from selfish_jax.data import corpus as corpus_lib


class _WordCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder for the known word-level corpora."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  DATASET = ''  # key of corpus_lib.KNOWN_CORPORA

  def __init__(self, *, source_dir: str | None = None, download_url: str | None = None,
               **kwargs):
    """``source_dir``: a folder with ``{split}.txt[.gz]``; else the splits are downloaded."""
    self._source_dir = source_dir
    self._download_url = download_url
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{corpus_lib.KNOWN_CORPORA[self.DATASET].name}, one example per line.',
        features=tfds.features.FeaturesDict({
            'index': tfds.features.Scalar(np.int64),
            'text': tfds.features.Text(),
        }),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    directory = self._source_dir or os.path.join(dl_manager.download_dir, self.name)
    return {split: self._generate_examples(directory, split) for split in corpus_lib.SPLITS}

  def _generate_examples(self, directory: str, split: str):
    text = corpus_lib.load_split_text(self.DATASET, split, directory,
                                      allow_download=self._source_dir is None,
                                      base_url=self._download_url)
    for index, line in enumerate(text.splitlines()):
      yield index, {'index': index, 'text': line}


class Ptb(_WordCorpusBuilder):
  """Penn TreeBank (Mikolov's language-modelling version)."""
  DATASET = 'ptb'


class Wikitext2(_WordCorpusBuilder):
  """WikiText-2 (v1, tokenized)."""
  DATASET = 'wikitext2'


def corpus_from_data_sources(sources: Mapping[str, object]) -> corpus_lib.Corpus:
  """Builds a :class:`Corpus` from the ``as_data_source()`` splits of a builder."""
  texts = {}
  for split in corpus_lib.SPLITS:
    source = sources[split]
    rows = source.__getitems__(list(range(len(source))))  # one batched read
    records = sorted((int(r['index']), r['text']) for r in rows)
    texts[split] = '\n'.join(
        t.decode('utf-8') if isinstance(t, bytes) else t for _, t in records) + '\n'
  return corpus_lib.corpus_from_texts(texts)
