"""Corpora, downloads and BPTT batching."""

from selfish_jax.data.batching import batchify, bptt_windows, num_windows, window
from selfish_jax.data.corpus import (KNOWN_CORPORA, Corpus, load_corpus, load_corpus_dir,
                                     tokenize)

__all__ = ['KNOWN_CORPORA', 'Corpus', 'batchify', 'bptt_windows', 'load_corpus',
           'load_corpus_dir', 'num_windows', 'tokenize', 'window']
