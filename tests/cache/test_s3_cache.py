"""S3-specific behaviour of the prefix cache, on the loopback moto S3 server.

Configuration (``storage_options`` or the AWS environment alone), secrets kept
out of every string and log line, missing buckets, listings that other
processes change, and stores without conditional PUTs.
"""

from __future__ import annotations

import errno
import logging
import pickle
from typing import Any

import numpy as np
import pytest

from eeipu_ray.cache import PrefixCache
from eeipu_ray.cache.fs_store import CacheStorageError, FsStore
from eeipu_ray.errors import CacheConfigError, CacheError
from tests.cache.test_prefix_cache import entry_for, value_for

SECRET = "testing-secret-key"  # the s3_server fixture's secret

AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


def _bucket_keys(s3_server: dict[str, Any], bucket_url: str) -> list[str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id=s3_server["storage_options"]["key"],
        aws_secret_access_key=s3_server["storage_options"]["secret"],
    )
    listed = client.list_objects_v2(Bucket=bucket_url.removeprefix("s3://"))
    return sorted(obj["Key"] for obj in listed.get("Contents", []))


def test_storage_options_configure_the_cache(s3_server: dict[str, Any], s3_bucket: str) -> None:
    assert s3_server["storage_options"]["secret"] == SECRET
    cache = PrefixCache(f"{s3_bucket}/team/sweep-1", storage_options=s3_server["storage_options"])
    key, meta = entry_for(0)
    assert cache.store(key, value_for(0), meta).published
    hit = cache.load(key)
    assert hit is not None and hit.layer == "durable"
    np.testing.assert_array_equal(hit.value, value_for(0))
    keys = _bucket_keys(s3_server, s3_bucket)
    assert keys and all(k.startswith(f"team/sweep-1/entries/{key}/") for k in keys)
    assert {k.rsplit("/", 1)[-1] for k in keys} == {"manifest.json", "used", "data"}


def test_aws_environment_alone_configures_the_cache(
    s3_server: dict[str, Any], s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # No config or credential files either: only the environment variables count.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    cache = PrefixCache(f"{s3_bucket}/from-env")
    key, meta = entry_for(3)
    assert cache.store(key, value_for(3), meta).published
    # Another instance (as in another trial process) finds it.
    clone = pickle.loads(pickle.dumps(cache))
    hit = clone.load(key)
    assert hit is not None
    np.testing.assert_array_equal(hit.value, value_for(3))
    assert _bucket_keys(s3_server, s3_bucket)[0].startswith("from-env/entries/")


def test_secret_never_shown_or_logged(
    s3_server: dict[str, Any], s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, botocore and s3fs included
    options = s3_server["storage_options"]
    cache = PrefixCache(
        f"{s3_bucket}/p", storage_options=options, byte_budget=10**7, touch_interval=0
    )
    key, meta = entry_for(0)
    cache.store(key, value_for(0), meta)
    assert cache.load(key) is not None
    cache.durable.fs.pipe_file(  # type: ignore[union-attr]
        f"{s3_bucket.removeprefix('s3://')}/p/entries/{key}/manifest.json", b"garbage"
    )
    assert cache.load(key) is None  # dropped, with a warning
    missing = PrefixCache("s3://no-such-bucket-eeipu/p", storage_options=options)
    with pytest.raises(CacheError) as info:
        missing.store(key, value_for(0), meta)
    shown = [
        repr(cache),
        str(cache),
        repr(cache.durable),
        str(info.value),
        repr(info.value),
        str(cache.stats()),
        repr(cache.entries()),
    ]
    assert all(SECRET not in s for s in shown)
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropping entry" in m for m in messages)
    assert all(SECRET not in m for m in messages)
    assert SECRET not in caplog.text

    # Credentials written into the URL itself are refused (s3fs would take them
    # for the bucket name), and the refusal masks them.
    with pytest.raises(CacheConfigError, match="credentials") as refused:
        PrefixCache(f"s3://AKIAEXAMPLE:{SECRET}@bucket/p")
    assert SECRET not in str(refused.value) and "AKIAEXAMPLE" not in str(refused.value)


def test_missing_bucket_fails_store_clearly(s3_server: dict[str, Any]) -> None:
    cache = PrefixCache(
        "s3://eeipu-bucket-that-does-not-exist/prefix", storage_options=s3_server["storage_options"]
    )
    key, meta = entry_for(0)
    with pytest.raises(CacheStorageError, match="bucket") as info:
        cache.store(key, value_for(), meta)
    assert isinstance(info.value, OSError) and key[:12] in str(info.value)
    assert "eeipu-bucket-that-does-not-exist" in str(info.value)
    assert not cache.contains(key)
    assert cache.load(key) is None
    assert cache.entries() == [] and cache.gc(older_than=0) == []


def test_listings_see_other_writers(s3_server: dict[str, Any], s3_bucket: str) -> None:
    # Two independent clients, as in two processes: no stale listing cache.
    mine = PrefixCache(f"{s3_bucket}/shared", storage_options=s3_server["storage_options"])
    theirs = PrefixCache(
        f"{s3_bucket}/shared",
        storage_options={**s3_server["storage_options"], "skip_instance_cache": True},
    )
    key, meta = entry_for(0)
    assert mine.entries() == [] and mine.pinned() == set() and not mine.contains(key)
    theirs.store(key, value_for(), meta)
    theirs.pin(key)
    assert mine.contains(key)
    assert [e.key for e in mine.entries()] == [key] and mine.pinned() == {key}
    theirs.unpin(key)
    theirs.delete(key)
    assert not mine.contains(key)
    assert mine.entries() == [] and mine.pinned() == set()


def test_store_without_conditional_puts_falls_back(
    s3_server: dict[str, Any],
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="eeipu_ray.cache")
    first = PrefixCache(f"{s3_bucket}/p", storage_options=s3_server["storage_options"])
    second = PrefixCache(
        f"{s3_bucket}/p",
        storage_options={**s3_server["storage_options"], "skip_instance_cache": True},
    )
    for cache in (first, second):  # an S3-compatible store that answers 501 NotImplemented
        fs = cache.durable.fs  # type: ignore[union-attr]
        plain = fs.pipe_file

        def no_conditional(path: str, data: bytes, *, _plain: Any = plain, **kwargs: Any) -> Any:
            if kwargs.pop("mode", "overwrite") == "create":
                raise OSError(errno.ENOSYS, "NotImplemented: conditional writes")
            return _plain(path, data, **kwargs)

        monkeypatch.setattr(fs, "pipe_file", no_conditional)

    key, meta = entry_for(0)
    assert first.store(key, value_for(), meta).published
    assert first.durable._conditional_put is False  # type: ignore[union-attr]
    assert any("conditional PUT" in r.getMessage() for r in caplog.records)
    # A racing writer that missed the first manifest: last writer wins, and the
    # first writer's data is left unreferenced until gc().
    monkeypatch.setattr(FsStore, "_has_manifest", lambda self, key: False)
    assert second.store(key, value_for(), meta).published
    monkeypatch.undo()
    assert first.load(key) is not None
    removed = first.gc(older_than=0)
    assert len(removed) == 1 and "/d-" in removed[0]
    assert first.verify(key).key == key and first.gc(older_than=0) == []


def test_gc_aborts_multipart_uploads_left_by_a_killed_writer(s3_server, s3_bucket, s3_client):
    """A writer killed mid-upload leaves an unfinished multipart upload, which S3
    keeps (and bills) until it is aborted; gc aborts the ones under the root."""
    cache = PrefixCache(s3_bucket + "/root", storage_options=s3_server["storage_options"])
    client = s3_client
    bucket = s3_bucket.removeprefix("s3://")
    inside = f"root/entries/{'a' * 64}/d-killed/data"
    outside = "elsewhere/big-upload"
    for key in (inside, outside):
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
        client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
        )

    removed = cache.gc(older_than=0)

    left = {u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert left == {outside}, "gc must abort uploads under the cache root and only those"
    assert any(inside in r for r in removed)
