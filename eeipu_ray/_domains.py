"""Recognizing Ray Tune search-space entries, without importing Ray.

Every part of the package that must tell a tunable entry from a constant asks
here. A Tune domain (``tune.uniform``, ``tune.choice``, ``tune.sample_from``,
...) is an instance of ``ray.tune.search.sample.Domain``; such an object can
only exist once that module is loaded, so the check looks the class up in
``sys.modules`` and never imports Ray itself. ``tune.grid_search([...])`` is
not an object of its own but the plain dict ``{"grid_search": [...]}``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

_SAMPLE_MODULE = "ray.tune.search.sample"


def is_domain(value: Any) -> bool:
    """Whether ``value`` is a Ray Tune domain object (``grid_search`` is not one)."""
    sample = sys.modules.get(_SAMPLE_MODULE)
    if sample is None:  # Ray's domains were never loaded: no value can be one
        return False
    return isinstance(value, sample.Domain)


def is_grid_search(value: Any) -> bool:
    """Whether ``value`` is ``tune.grid_search([...])``, i.e. ``{"grid_search": [...]}``."""
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def is_tunable(value: Any) -> bool:
    """Whether ``value`` is a Tune domain or a ``grid_search``: a value Tune
    chooses per trial, never a constant."""
    return is_domain(value) or is_grid_search(value)


def mentions_domain(value: Any) -> bool:
    """Whether ``value`` is a Tune domain or ``grid_search``, or a mapping that
    holds one at any depth."""
    if is_tunable(value):
        return True
    if isinstance(value, Mapping):
        return any(mentions_domain(v) for v in value.values())
    return False
