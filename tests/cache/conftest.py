"""Fixtures of the cache tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cache.test_prefix_cache import Backend, _local_backend, _s3_backend


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A cache location on the local disk, then on the loopback S3 server."""
    if request.param == "local":
        return _local_backend(tmp_path)
    return _s3_backend(request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket"))
