"""Shared fixtures of the pipeline tests."""

# Tiny models gain nothing from threads: the search tests' one-thread fixture
# applies here too.
from tests.search.conftest import _single_torch_thread  # noqa: F401
