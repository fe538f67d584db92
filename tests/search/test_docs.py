"""The ``Example:`` blocks of the search modules (and the synthetic layouts') run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "eeipu_ray.search.space",
    "eeipu_ray.search.records",
    "eeipu_ray.search.models",
    "eeipu_ray.search.acquisition",
    "eeipu_ray.search.optimize",
    "eeipu_ray.search.engine",
    "eeipu_ray.pipelines.synthetic",
    "eeipu_ray.pipelines._synthetic_layouts",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
