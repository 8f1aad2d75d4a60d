"""Exceptions of the progressive search.

They subclass :class:`nni_effbert.errors.EffBertError` so callers can catch every error
nni-effbert raises on purpose, and ``ValueError`` / ``RuntimeError`` so code that does not
know this package still catches them the usual way.

Note that :class:`SearchConfigError` is deliberately *not* a
:class:`nni_effbert.errors.ConfigError`: the YAML loader wraps plain ``ValueError`` raised by
a dataclass into a ``ConfigError`` that names ``file:dotted.key``, and passes a
``ConfigError`` through unchanged (which would lose the location).
"""
from __future__ import annotations

from nni_effbert.errors import EffBertError

__all__ = ["SearchConfigError", "BudgetError", "SearchStateError", "SearchFailedError", "WarmupFailedError"]


class SearchConfigError(EffBertError, ValueError):
    """Search settings (stages, sampler, tuner arguments) are invalid."""


class BudgetError(SearchConfigError):
    """No architecture of the space can meet the parameter budget."""


class SearchStateError(EffBertError, ValueError):
    """A saved search state cannot be loaded (corrupt, other space, other stages)."""


class SearchFailedError(EffBertError, RuntimeError):
    """The search cannot go on (e.g. every candidate of a stage failed)."""


class WarmupFailedError(SearchFailedError):
    """A stage's warm-up failed, so its candidates cannot be scored: the search stops."""
