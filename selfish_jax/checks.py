"""The checks of config values every config uses (the training config, each
model family's keys, the classification config), each raising a
:class:`~selfish_jax.errors.ConfigError` that names the key. They read any
mapping of values by key: a config, or the few keys a family is handed."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from selfish_jax.errors import ConfigError


def check_choice(values: Mapping, key: str, choices: Iterable) -> None:
  if values[key] not in choices:
    raise ConfigError(f'unknown {key} {values[key]!r}; expected one of {tuple(choices)}')


def check_int(values: Mapping, key: str, minimum: int = 1) -> None:
  """An integer (not a bool) of at least ``minimum``."""
  value = values[key]
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ConfigError(f'{key} must be an integer >= {minimum}, got {value!r}')


def check_fractions(values: Mapping, keys: Iterable[str]) -> None:
  """Dropout-like keys: each in [0, 1)."""
  for key in keys:
    if not 0.0 <= values[key] < 1.0:
      raise ConfigError(f'{key} must be in [0, 1), got {values[key]!r}')


def check_finite_numbers(values: Mapping) -> None:
  """Every number of the config (those in tuples too) is finite: NaN or inf,
  which no key means, is refused before anything is written."""
  for key, value in values.items():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(f'{key} must be a finite number, got {item!r}')


def check_at_least(values: Mapping, key: str, minimum: float = 0.0) -> None:
  if not values[key] >= minimum:
    raise ConfigError(f'{key} must be >= {minimum}, got {values[key]!r}')
