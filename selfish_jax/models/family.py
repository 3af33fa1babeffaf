"""What a language-model family declares about itself: its config keys with their
defaults, their checks, and its constructor.

Each family module (``lstm.py``, ``rhn.py``, ``onlstm.py``, ``mos.py``) ends
with its ``FAMILY``; :mod:`selfish_jax.models.interface` lists them, and the
training config (:func:`selfish_jax.config.default_config`) takes every
family's keys from here. Keys every family reads (``emsize``, ``nhid``,
``nlayers``, ``dropout``, ``tied``, ``compute_dtype``, ``loss_chunk_rows``)
are the config's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import ml_collections

from selfish_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
  """One ``config.model``.

  Attributes:
    name: the ``config.model`` value.
    defaults: the config keys only this family (or a few families) reads, with
      their defaults; under another family they must keep the default.
    build: ``(config, vocab_size, common) -> module``, where ``common`` holds
      the constructor arguments every family takes (see ``interface.build_model``).
    check: raises ConfigError for values the family cannot build.
  """
  name: str
  defaults: Mapping[str, Any]
  build: Callable[[ml_collections.ConfigDict, int, dict], nn.Module]
  check: Callable[[ml_collections.ConfigDict], None] = lambda config: None

  @property
  def keys(self) -> frozenset[str]:
    return frozenset(self.defaults)


def pick(config: ml_collections.ConfigDict, keys) -> dict:
  """``{key: config[key]}`` for ``keys``: constructor arguments named as the config's keys."""
  return {k: config[k] for k in keys}


def check_tied_square(config: ml_collections.ConfigDict) -> None:
  if config.tied and config.emsize != config.nhid:
    raise ConfigError(f'tied weights need emsize == nhid, got {config.emsize} and {config.nhid}')
