"""How the cache reports storage it cannot use: its own errors, bounded retries.

The faults themselves (an S3 endpoint that refuses, drops or stalls, a full
disk, eviction under load) are injected in
``tests/reliability/test_storage_faults.py``; this module checks the pieces
without a network fault: URL checks, masking, the retry defaults an ``s3://``
cache gets, and which exceptions become the cache's errors.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from eeipu_ray.cache import CacheUnreachableError, PrefixCache
from eeipu_ray.cache.fs_store import (
    S3_DEFAULT_CONFIG,
    S3_DEFAULT_RETRIES,
    FsStore,
    redact_url,
)
from eeipu_ray.errors import CacheConfigError, CacheStorageError
from tests.cache.test_prefix_cache import entry_for, value_for


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("s3://AKIA:se/cr@et@bucket/p", "s3://***@bucket/p"),  # AWS secrets hold '/'
        ("https://user:pw@host/x", "https://***@host/x"),
        ("s3://bucket/a@b", "s3://bucket/a@b"),  # an '@' in the path is no credential
        ("simplecache::s3://k:s@bucket", "simplecache::s3://***@bucket"),
        ("/tmp/cache", "/tmp/cache"),
    ],
)
def test_redact_url_masks_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("s3://AKIA:hush-hush@bucket/p", "credentials in it"),
        ("s3:///prefix", "names no bucket"),
        ("s3://bad bucket/p", "not a valid S3 bucket name"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/p\x00", "NUL"),
    ],
)
def test_bad_cache_urls_fail_at_construction(url: str, says: str) -> None:
    with pytest.raises(CacheConfigError, match=says) as info:
        PrefixCache(url)
    assert "hush-hush" not in str(info.value) and "AKIA" not in str(info.value)


def test_s3_caches_get_bounded_retries_unless_told_otherwise(
    s3_server: dict[str, Any], s3_bucket: str
) -> None:
    store = PrefixCache(s3_bucket, storage_options=s3_server["storage_options"]).durable
    assert store is not None
    assert store.fs.retries == S3_DEFAULT_RETRIES
    config = store.fs.config_kwargs
    assert config["connect_timeout"] == S3_DEFAULT_CONFIG["connect_timeout"]
    assert config["read_timeout"] == S3_DEFAULT_CONFIG["read_timeout"]
    assert config["retries"] == S3_DEFAULT_CONFIG["retries"]

    chosen = {
        **s3_server["storage_options"],
        "retries": 4,
        "config_kwargs": {"read_timeout": 60, "retries": {"total_max_attempts": 7}},
    }
    store = PrefixCache(s3_bucket, storage_options=chosen).durable
    assert store is not None
    assert store.fs.retries == 4
    config = store.fs.config_kwargs
    assert config["read_timeout"] == 60 and config["connect_timeout"] == 5
    assert config["retries"] == {"total_max_attempts": 7, "mode": "standard"}
    # The caller's options are not modified.
    assert chosen["config_kwargs"] == {"read_timeout": 60, "retries": {"total_max_attempts": 7}}


@pytest.mark.parametrize("retries", [0, -1, 1.5, True, "3"])
def test_invalid_s3_retries_are_refused(
    s3_server: dict[str, Any], s3_bucket: str, retries: Any
) -> None:
    cache = PrefixCache(
        s3_bucket, storage_options={**s3_server["storage_options"], "retries": retries}
    )
    with pytest.raises(CacheConfigError, match="retries"):
        cache.contains(entry_for(0)[0])


@pytest.mark.parametrize("cooldown", [-1, float("inf"), float("nan"), True, "30"])
def test_invalid_unreachable_cooldown_is_refused(tmp_path: Path, cooldown: Any) -> None:
    with pytest.raises(CacheConfigError, match="unreachable_cooldown"):
        PrefixCache(tmp_path, unreachable_cooldown=cooldown)


def test_nothing_listening_is_unreachable_and_names_the_entry(s3_server: dict[str, Any]) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {
        **s3_server["storage_options"],
        "endpoint_url": f"http://127.0.0.1:{port}",
        "retries": 1,
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}},
    }
    cache = PrefixCache("s3://no-server/p", storage_options=options)
    key, meta = entry_for(0)
    with pytest.raises(CacheUnreachableError, match=key[:12]) as info:
        cache.store(key, value_for(0), meta)
    assert "s3://no-server/p" in str(info.value) and "stage 'prep'" in str(info.value)
    assert s3_server["storage_options"]["secret"] not in str(info.value)


def test_a_bug_is_not_dressed_up_as_a_storage_error(tmp_path: Path) -> None:
    store = FsStore(str(tmp_path))
    with pytest.raises(ZeroDivisionError), store._storage_call("write", entry_for(0)[0]):
        1 / 0  # noqa: B018 - not raised by the storage stack: passes unchanged


def test_local_errors_are_storage_errors_never_unreachable(tmp_path: Path) -> None:
    store = FsStore(str(tmp_path))
    key = entry_for(0)[0]
    with pytest.raises(CacheStorageError) as info, store._storage_call("write", key, stage="prep"):
        raise OSError(errno.ECONNREFUSED, "refused")  # a local disk is never "unreachable"
    assert not isinstance(info.value, CacheUnreachableError)
    assert key[:12] in str(info.value) and "stage 'prep'" in str(info.value)
