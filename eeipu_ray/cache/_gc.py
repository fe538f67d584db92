"""Listing a store's entries, and removing what no manifest references: data of
interrupted or losing writers, temporary manifests, stale "used" marks, and
(on S3) unfinished multipart uploads."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from eeipu_ray.cache._layout import KEY_RE, MANIFEST, USED, data_dir_of

if TYPE_CHECKING:
    from eeipu_ray.cache.fs_store import FsStore

logger = logging.getLogger("eeipu_ray.cache")


@dataclass(frozen=True)
class StoredEntry:
    """One entry as seen by a listing."""

    key: str
    bytes: int
    last_used: float
    complete: bool  # has a manifest
    pinned: bool = False


def entries(store: FsStore) -> list[StoredEntry]:
    """Every entry (complete or not) with its size and last use, one listing call."""
    base = f"{store.root}/entries"
    with store._storage_call("list the entries"):
        if store.is_local:
            found = _find_local(base)
        else:
            store._fresh(base)
            try:
                found = store.fs.find(base, detail=True)
            except FileNotFoundError:
                return []
    prefix = base.rstrip("/") + "/"
    sizes: dict[str, int] = {}
    used_mark: dict[str, float] = {}
    newest: dict[str, float] = {}
    complete: set[str] = set()
    for path, info in found.items():
        if not path.startswith(prefix):
            continue
        key, _, rest = path[len(prefix) :].partition("/")
        if not KEY_RE.fullmatch(key) or not rest:
            continue
        sizes[key] = sizes.get(key, 0) + int(info.get("size") or 0)
        if rest == USED:
            used_mark[key] = _mtime(info)
        else:
            newest[key] = max(newest.get(key, 0.0), _mtime(info))
        if rest == MANIFEST:
            complete.add(key)
    pins = store.pinned()
    return [
        StoredEntry(k, sizes[k], used_mark.get(k, newest.get(k, 0.0)), k in complete, k in pins)
        for k in sizes
    ]


def iter_orphans(store: FsStore, older_than: float) -> Iterator[str]:
    """Paths that no manifest references, last written at least ``older_than``
    seconds ago: data of interrupted or losing writers, temporary manifests,
    and "used" marks of removed entries."""
    cutoff = time.time() - older_than
    base = f"{store.root}/entries"
    store._fresh(base)
    try:
        listed = store.fs.ls(base, detail=False)
    except FileNotFoundError:
        return
    for key in (p.rstrip("/").rsplit("/", 1)[-1] for p in listed):
        if not KEY_RE.fullmatch(key):
            continue
        entry = f"{base}/{key}"
        raw = store.read_manifest(key)
        live = data_dir_of(raw) if raw is not None else None
        store._fresh(entry)
        try:
            items = store.fs.ls(entry, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed meanwhile
        for item in items:
            name = item["name"].rstrip("/").rsplit("/", 1)[-1]
            if name in (MANIFEST, live) or (name == USED and raw is not None):
                continue
            is_dir = item.get("type") == "directory"
            mtime = (
                _dir_mtime(store.fs, item["name"])
                if is_dir and not store.is_local
                else (_mtime(item))
            )
            if mtime <= cutoff:
                yield item["name"]


def collect_garbage(store: FsStore, older_than: float) -> list[str]:
    """Remove what :func:`iter_orphans` yields, and local entry directories
    left empty. Returns the removed paths."""
    with store._storage_call("collect garbage"):
        removed = list(store.iter_orphans(older_than))
        for path in removed:
            store.remove_path(path)
        if store.protocol in ("s3", "s3a"):
            removed += _abort_stale_uploads(store, older_than)
    if store.is_local:
        base = os.path.join(store.root, "entries")
        with contextlib.suppress(FileNotFoundError):
            for key in os.listdir(base):
                if KEY_RE.fullmatch(key):
                    with contextlib.suppress(OSError):  # not empty: in use
                        os.rmdir(os.path.join(base, key))
    return removed


def _abort_stale_uploads(store: FsStore, older_than: float) -> list[str]:
    """Abort multipart uploads under this cache's root that a killed writer
    left unfinished (S3 keeps, and bills, their parts until aborted)."""
    bucket, _, prefix = store.root.partition("/")
    cutoff = time.time() - older_than
    aborted = []
    try:
        uploads = store.fs.list_multipart_uploads(bucket)
    except (OSError, ValueError) as exc:
        logger.info("prefix cache: cannot list multipart uploads of %s: %s", bucket, exc)
        return []
    entries_prefix = f"{prefix}/entries/" if prefix else "entries/"
    for upload in uploads:
        key = upload.get("Key", "")
        if (
            not key.startswith(entries_prefix)
            or _mtime({"created": upload.get("Initiated")}) > cutoff
        ):
            continue
        with contextlib.suppress(OSError, ValueError):
            store.fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"]
            )
            aborted.append(f"{bucket}/{key} (upload {upload['UploadId'][:12]})")
    return aborted


def _find_local(base: str) -> dict[str, dict[str, Any]]:
    """Every file under ``base`` with its size and mtime, as ``fs.find(detail=True)``.

    Other processes evict and publish while this walks: a file or directory
    that vanishes between listing and ``stat`` is skipped (fsspec's ``find``
    would fail the whole listing, and an empty answer would hide every entry
    from the eviction that asked).
    """
    found: dict[str, dict[str, Any]] = {}
    pending = [base]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                items = list(listing)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for item in items:
            try:
                if item.is_dir(follow_symlinks=False):
                    pending.append(item.path)
                    continue
                stat = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found[item.path] = {"size": stat.st_size, "mtime": stat.st_mtime}
    return found


def _mtime(info: Mapping[str, Any]) -> float:
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return 0.0


def _dir_mtime(fs: Any, path: str) -> float:
    # Object stores have no directory mtimes: use the newest file inside.
    try:
        return max((_mtime(i) for i in fs.find(path, detail=True).values()), default=0.0)
    except FileNotFoundError:
        return 0.0
