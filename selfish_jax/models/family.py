"""What a language-model family declares about itself: its config keys with their
defaults, their checks, and its constructor.

Each family module (``lstm.py``, ``rhn.py``, ``onlstm.py``, ``mos.py``) ends
with its ``FAMILY``; :mod:`selfish_jax.models.interface` lists them, and the
training config (:func:`selfish_jax.config.default_config`) takes every
family's keys from here. Keys every family reads (``emsize``, ``nhid``,
``nlayers``, ``dropout``, ``tied``, ``compute_dtype``, ``loss_chunk_rows``)
are the config's own.

A family never sees the config: :func:`~selfish_jax.models.interface.build_model`
reads the family's keys and :data:`SHARED_KEYS` by name and hands it those
values as a plain dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn

from selfish_jax.errors import ConfigError

# The config's own keys a family's build and check may read besides its own.
SHARED_KEYS = ('emsize', 'nhid', 'nlayers', 'tied')


@dataclasses.dataclass(frozen=True)
class Family:
  """One ``config.model``.

  Attributes:
    name: the ``config.model`` value.
    defaults: the config keys only this family (or a few families) reads, with
      their defaults; under another family they must keep the default.
    build: ``(values, vocab_size, common) -> module``: ``values`` maps the
      family's keys and :data:`SHARED_KEYS` to the config's values, ``common``
      holds the constructor arguments every family takes (see
      ``interface.build_model``).
    check: ``values -> None``, raising ConfigError for values the family cannot build.
  """
  name: str
  defaults: Mapping[str, Any]
  build: Callable[[Mapping[str, Any], int, dict], nn.Module]
  check: Callable[[Mapping[str, Any]], None] = lambda values: None

  @property
  def keys(self) -> frozenset[str]:
    return frozenset(self.defaults)


def pick(values: Mapping[str, Any], keys) -> dict:
  """``{key: values[key]}`` for ``keys``: constructor arguments named as the config's keys."""
  return {k: values[k] for k in keys}


def check_tied_square(values: Mapping[str, Any]) -> None:
  if values['tied'] and values['emsize'] != values['nhid']:
    raise ConfigError(f'tied weights need emsize == nhid, got {values["emsize"]} and '
                      f'{values["nhid"]}')
