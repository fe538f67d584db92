"""Publishing an entry atomically: its data first, its manifest last.

* local directory: data is written into a fresh ``d-<token>`` directory, the
  manifest into a temporary file, and the manifest is linked into place with
  ``os.link``, which fails if another writer won; the loser removes its data.
* S3: data objects first, the manifest last as one exclusive PUT
  (``If-None-Match: *``): exactly one writer's manifest lands, and the losers
  remove their data. On a store that does not implement conditional PUTs the
  manifest is a plain PUT (atomic, last writer wins); every writer reads the
  manifest back and removes its own data when another manifest replaced its.
* other fsspec filesystems: as S3 without the conditional PUT.

A write that fails because the store became unreachable does not try to remove
its data objects (that would wait out the timeouts once more): they have no
manifest, stay invisible, and garbage collection removes them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from eeipu_ray.cache._hashing import HashingWriter
from eeipu_ray.cache._layout import MANIFEST, USED, data_dir_of
from eeipu_ray.cache._resilience import from_storage_stack, is_unreachable
from eeipu_ray.cache._urls import redact_url
from eeipu_ray.cache.codecs import PartData, iter_blobs, write_part
from eeipu_ray.cache.errors import CacheStorageError
from eeipu_ray.cache.manifest import FileRecord, checksum

if TYPE_CHECKING:
    from eeipu_ray.cache.fs_store import FsStore

logger = logging.getLogger("eeipu_ray.cache")

#: Object stores whose PUT takes ``If-None-Match: *`` through s3fs ``mode="create"``.
_CONDITIONAL_PUT_PROTOCOLS = ("s3", "s3a")

#: The encoded parts of an entry, by part name.
Parts = Mapping[str, PartData]
#: ``manifest_for(data_dir, files)``: the manifest's bytes.
ManifestFor = Callable[[str, tuple[FileRecord, ...]], bytes]
#: ``(published, data_dir, files)``, as :meth:`FsStore.publish` returns it.
Published = tuple[bool, str, tuple[FileRecord, ...]]


def publish(
    store: FsStore, key: str, data_dir: str, parts: Parts, manifest_for: ManifestFor
) -> Published:
    """Write ``parts`` into ``data_dir`` of the entry, then its manifest
    (:meth:`FsStore.publish`)."""
    if store._has_manifest(key):  # cheap early exit; os.link or the manifest PUT decides races
        return False, data_dir, ()
    entry = store._entry(key)
    if store.is_local:
        won, files = _publish_local(store.root, entry, data_dir, parts, manifest_for)
    else:
        won, files = _publish_remote(store, entry, data_dir, parts, manifest_for)
    return won, data_dir, files


def _publish_local(
    root: str, entry: str, data_dir: str, parts: Parts, manifest_for: ManifestFor
) -> tuple[bool, tuple[FileRecord, ...]]:
    final = os.path.join(entry, MANIFEST)
    data_path = os.path.join(entry, data_dir)
    tmp_manifest = os.path.join(entry, f".{data_dir}.manifest.tmp")
    won = False
    try:
        _makedirs_fresh(data_path)
        files = []
        for name, data in parts.items():
            path = os.path.join(data_path, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                sink = HashingWriter(fh)
                write_part(data, sink)
            files.append(FileRecord(name, sink.size, sink.hexdigest()))
        with open(tmp_manifest, "wb") as fh:
            fh.write(manifest_for(data_dir, tuple(files)))
        try:
            os.link(tmp_manifest, final)  # atomic; fails if another writer won
            won = True
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise CacheStorageError(
                    f"the filesystem of cache directory {root!r} does not support "
                    f"hard links ({exc.strerror}), which publishing an entry atomically "
                    "needs; put the cache on a local POSIX filesystem or use s3://"
                ) from exc
            raise
    finally:
        if not won:
            shutil.rmtree(data_path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_manifest)
    if won:
        with contextlib.suppress(OSError):  # LRU bookkeeping only
            open(os.path.join(entry, USED), "wb").close()
    return won, tuple(files)


def _publish_remote(
    store: FsStore, entry: str, data_dir: str, parts: Parts, manifest_for: ManifestFor
) -> tuple[bool, tuple[FileRecord, ...]]:
    manifest_path = f"{entry}/{MANIFEST}"
    data_prefix = f"{entry}/{data_dir}"
    won = False
    files = []
    try:
        for name, data in parts.items():
            blobs = iter_blobs(data)
            files.append(
                FileRecord(name, sum(memoryview(b).nbytes for b in blobs), checksum(blobs))
            )
            _write_remote(store.fs, f"{data_prefix}/{name}", blobs)
        won = _put_manifest(store, manifest_path, manifest_for(data_dir, tuple(files)), data_dir)
    except Exception as exc:
        # A store that stopped answering would make the clean-up wait out the
        # timeouts once more; the data has no manifest (invisible) and gc()
        # removes it. A retried manifest PUT may even have landed: then the
        # data belongs to a complete entry and must stay.
        if not is_unreachable(exc):
            _remove_quietly(store, data_prefix)
        raise
    if not won:
        _remove_quietly(store, data_prefix)
    if won:
        with contextlib.suppress(Exception):  # LRU bookkeeping only
            store.fs.pipe_file(f"{entry}/{USED}", b"")
    return won, tuple(files)


def _remove_quietly(store: FsStore, path: str) -> None:
    try:
        store._rm_quiet(path)
    except Exception as exc:  # never hide the original error; gc() retries later
        if not from_storage_stack(exc):
            raise
        logger.info("prefix cache: could not remove %s: %s", path, exc)


def _put_manifest(store: FsStore, path: str, body: bytes, data_dir: str) -> bool:
    """Put the manifest; True if this writer's manifest is the entry's."""
    if store._conditional_put is not False and store.protocol in _CONDITIONAL_PUT_PROTOCOLS:
        try:
            store.fs.pipe_file(path, body, mode="create")
        except FileExistsError:
            # Another writer won -- or a retried PUT of ours landed first.
            return _manifest_data_dir(store.fs, path) == data_dir
        except OSError as exc:
            if exc.errno != errno.ENOSYS and "NotImplemented" not in str(exc):
                raise
            logger.info(
                "prefix cache: %s does not implement conditional PUTs; racing "
                "writers of one key fall back to last-writer-wins",
                redact_url(store.url),
            )
            store._conditional_put = False
        else:
            store._conditional_put = True
    if not store._conditional_put:
        store.fs.pipe_file(path, body)
    # Read back: a store that ignores If-None-Match, or a plain PUT, may have
    # let another writer's manifest replace ours; then our data is unreferenced.
    return _manifest_data_dir(store.fs, path) == data_dir


def _manifest_data_dir(fs: Any, path: str) -> str | None:
    try:
        raw = fs.cat_file(path)
    except (FileNotFoundError, ValueError):
        return None
    return data_dir_of(raw)


def _write_remote(fs: Any, path: str, blobs: list[Any]) -> None:
    if len(blobs) == 1:
        blob = blobs[0]
        fs.pipe_file(path, blob if isinstance(blob, bytes) else bytes(memoryview(blob)))
        return
    with fs.open(path, "wb") as fh:
        for blob in blobs:
            fh.write(memoryview(blob))


def _makedirs_fresh(path: str) -> None:
    # A concurrent gc may remove the (empty) entry directory between creating it
    # and creating ``path`` inside it: try again.
    for attempt in range(3):
        try:
            os.makedirs(path)
            return
        except FileNotFoundError:
            if attempt == 2:
                raise
