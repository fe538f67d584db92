"""Durable cache storage on any fsspec filesystem: a local directory, ``s3://``, ...

Layout under the root::

    entries/<key>/manifest.json      written last: the entry exists once it exists
    entries/<key>/d-<token>/<part>   the data, one file per encoded part
    entries/<key>/used               touched on every use (its mtime drives LRU)
    entries/<key>/.d-<token>.manifest.tmp   a local writer's manifest before it is linked
    pins/<key>                       present while the searcher protects the prefix

Keys are checked (64 hex characters) before they touch a path, and part names
are checked by the codec registry (and again when a manifest is read), so
nothing a hyperparameter holds can steer a read or write outside the root.

Publishing is atomic:

* local directory: data is written into a fresh ``d-<token>`` directory, the
  manifest into a temporary file, and the manifest is linked into place with
  ``os.link``, which fails if another writer won; the loser removes its data.
* S3: data objects first, the manifest last as one exclusive PUT
  (``If-None-Match: *``): exactly one writer's manifest lands, and the losers
  remove their data. On a store that does not implement conditional PUTs the
  manifest is a plain PUT (atomic, last writer wins); every writer reads the
  manifest back and removes its own data when another manifest replaced its.
* other fsspec filesystems: as S3 without the conditional PUT.

Whatever a writer leaves behind when it dies (data without a manifest, a
temporary manifest) is invisible to readers and removed by
:meth:`FsStore.collect_garbage` once it is older than a grace period.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import xxhash

from eeipu_ray.cache.codecs import PartData, iter_blobs, write_part
from eeipu_ray.cache.manifest import FileRecord, checksum
from eeipu_ray.errors import CacheConfigError, CacheError, CacheStorageError
from eeipu_ray.pipeline.keys import check_key

logger = logging.getLogger("eeipu_ray.cache")

MANIFEST = "manifest.json"
USED = "used"

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_LOCAL_PROTOCOLS = ("file", "local")
#: Object stores whose PUT takes ``If-None-Match: *`` through s3fs ``mode="create"``.
_CONDITIONAL_PUT_PROTOCOLS = ("s3", "s3a")


@dataclass(frozen=True)
class StoredEntry:
    """One entry as seen by a listing."""

    key: str
    bytes: int
    last_used: float
    complete: bool  # has a manifest
    pinned: bool = False


def redact_url(url: str) -> str:
    """``url`` without credentials written into it (``s3://KEY:SECRET@bucket``)."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


class FsStore:
    """Low-level entry storage on an fsspec filesystem.

    Args:
        url: A local path, ``file://...``, ``s3://bucket/prefix`` or any fsspec URL.
        storage_options: Passed to fsspec (for S3: ``endpoint_url``, ``key``,
            ``secret``, ``client_kwargs={"region_name": ...}``, ...). Without
            them s3fs reads the usual AWS environment (``AWS_ACCESS_KEY_ID``,
            ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
            ``AWS_PROFILE``). Never logged or shown.

    Raises:
        CacheConfigError: for an empty URL, an unknown scheme, or a scheme whose
            filesystem package is not installed.
    """

    def __init__(
        self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.url = os.fspath(url)
        if not self.url:
            raise CacheConfigError("cache URL is empty; give a directory or an s3:// URL")
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise CacheConfigError(
                f"storage_options must be a mapping of fsspec options, got "
                f"{type(storage_options).__name__}"
            )
        self.storage_options = dict(storage_options or {})
        self.protocol = _check_protocol(self.url)
        self._fs: Any = None
        self._root: str | None = None
        self._local: bool | None = None
        self._conditional_put: bool | None = None  # learned on the first publish

    # fsspec filesystems hold clients and sockets; rebuild them after unpickling.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_root": None, "_local": None}

    def __repr__(self) -> str:  # never shows storage_options (credentials)
        return f"FsStore({redact_url(self.url)!r})"

    def _open_fs(self) -> None:
        import fsspec

        options = dict(self.storage_options)
        if self.protocol not in (None, *_LOCAL_PROTOCOLS) and "::" not in self.url:
            # Other processes write the same bucket: a cached listing would show
            # entries they removed and hide entries they added.
            options.setdefault("use_listings_cache", False)
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ValueError, ImportError, TypeError) as exc:
            raise CacheConfigError(
                f"cannot open cache URL {redact_url(self.url)!r}: {_scrub(exc, options)}"
            ) from None
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        local = protocol in _LOCAL_PROTOCOLS
        root = root.rstrip("/") or "/"
        if local:
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as exc:
                raise CacheStorageError(
                    f"cannot create the cache directory {root!r}: {exc.strerror or exc}"
                ) from exc
        self._fs, self._root, self._local = fs, root, local

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._open_fs()
        return self._fs

    @property
    def root(self) -> str:
        if self._root is None:
            self._open_fs()
        assert self._root is not None
        return self._root

    @property
    def is_local(self) -> bool:
        if self._local is None:
            self._open_fs()
        return bool(self._local)

    def _fresh(self, path: str) -> None:
        """Forget cached listings under ``path`` (other processes write here too)."""
        if not self.is_local:
            with contextlib.suppress(Exception):  # best effort: not every fs caches
                self.fs.invalidate_cache(path)

    # ----------------------------------------------------------------- paths
    def _entry(self, key: str) -> str:
        return f"{self.root}/entries/{check_key(key)}"

    def _data_path(self, key: str, data_dir: str, part: str) -> str:
        return f"{self._entry(key)}/{data_dir}/{part}"

    # ----------------------------------------------------------------- reads
    def read_manifest(self, key: str) -> bytes | None:
        """The manifest's bytes, or ``None`` when the entry does not exist."""
        path = f"{self._entry(key)}/{MANIFEST}"
        try:
            if self.is_local:
                with open(path, "rb") as fh:
                    return fh.read()
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def read_part(self, key: str, data_dir: str, part: str) -> Any:
        """The part's bytes as a buffer; local files are memory-mapped (zero copy).

        Raises:
            FileNotFoundError: the part is missing.
        """
        path = self._data_path(key, data_dir, part)
        if self.is_local:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    return b""
                # Private (copy-on-write) mapping: zero-copy, yet writable, so a
                # stage may modify a loaded input in place without touching the file.
                return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self.fs.cat_file(path)

    def exists(self, key: str) -> bool:
        path = f"{self._entry(key)}/{MANIFEST}"
        if self.is_local:
            return os.path.exists(path)
        self._fresh(path)
        return bool(self.fs.exists(path))

    # ---------------------------------------------------------------- writes
    def publish(
        self,
        key: str,
        parts: Mapping[str, PartData],
        manifest_for: Callable[[str, tuple[FileRecord, ...]], bytes],
    ) -> tuple[bool, str, tuple[FileRecord, ...]]:
        """Write ``parts`` and then the manifest.

        Sizes and checksums are computed while the data is written (local files
        are written straight from the codec's stream through a hashing wrapper).
        ``manifest_for(data_dir, files)`` returns the manifest bytes.

        Returns:
            ``(published, data_dir, files)``; ``published`` is False when another
            writer's entry for the same key won (its entry stays, this writer's
            data is removed).

        Raises:
            CacheStorageError: the backend refused the write; nothing of this
                writer stays visible.
        """
        data_dir = f"d-{uuid.uuid4().hex}"
        try:
            if self.is_local:
                return self._publish_local(key, data_dir, parts, manifest_for)
            return self._publish_remote(key, data_dir, parts, manifest_for)
        except CacheError:
            raise
        except OSError as exc:
            raise CacheStorageError(
                f"prefix cache: could not write entry {key[:12]} to {redact_url(self.url)!r}: "
                f"{_describe_os_error(exc)}"
            ) from exc

    def _publish_local(
        self,
        key: str,
        data_dir: str,
        parts: Mapping[str, PartData],
        manifest_for: Callable[[str, tuple[FileRecord, ...]], bytes],
    ) -> tuple[bool, str, tuple[FileRecord, ...]]:
        if self.exists(key):  # cheap early exit; os.link below decides races
            return False, data_dir, ()
        entry = self._entry(key)
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
                    sink = _HashingWriter(fh)
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
                        f"the filesystem of cache directory {self.root!r} does not support "
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
        return won, data_dir, tuple(files)

    def _publish_remote(
        self,
        key: str,
        data_dir: str,
        parts: Mapping[str, PartData],
        manifest_for: Callable[[str, tuple[FileRecord, ...]], bytes],
    ) -> tuple[bool, str, tuple[FileRecord, ...]]:
        entry = self._entry(key)
        manifest_path = f"{entry}/{MANIFEST}"
        if self.exists(key):
            return False, data_dir, ()
        data_prefix = f"{entry}/{data_dir}"
        won = False
        files = []
        try:
            for name, data in parts.items():
                blobs = iter_blobs(data)
                files.append(
                    FileRecord(name, sum(memoryview(b).nbytes for b in blobs), checksum(blobs))
                )
                self._write_remote(f"{data_prefix}/{name}", blobs)
            won = self._put_manifest(manifest_path, manifest_for(data_dir, tuple(files)), data_dir)
        finally:
            if not won:
                with contextlib.suppress(OSError):  # never hide the original error
                    self._rm_quiet(data_prefix)
        if won:
            with contextlib.suppress(OSError):
                self.fs.pipe_file(f"{entry}/{USED}", b"")
        return won, data_dir, tuple(files)

    def _put_manifest(self, path: str, body: bytes, data_dir: str) -> bool:
        """Put the manifest; True if this writer's manifest is the entry's."""
        if self._conditional_put is not False and self.protocol in _CONDITIONAL_PUT_PROTOCOLS:
            try:
                self.fs.pipe_file(path, body, mode="create")
            except FileExistsError:
                # Another writer won -- or a retried PUT of ours landed first.
                return self._manifest_data_dir(path) == data_dir
            except OSError as exc:
                if exc.errno != errno.ENOSYS and "NotImplemented" not in str(exc):
                    raise
                logger.info(
                    "prefix cache: %s does not implement conditional PUTs; racing "
                    "writers of one key fall back to last-writer-wins",
                    redact_url(self.url),
                )
                self._conditional_put = False
            else:
                self._conditional_put = True
        if not self._conditional_put:
            self.fs.pipe_file(path, body)
        # Read back: a store that ignores If-None-Match, or a plain PUT, may have
        # let another writer's manifest replace ours; then our data is unreferenced.
        return self._manifest_data_dir(path) == data_dir

    def _manifest_data_dir(self, path: str) -> str | None:
        try:
            doc = json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return None
        return doc.get("data_dir") if isinstance(doc, dict) else None

    def _write_remote(self, path: str, blobs: list[Any]) -> None:
        if len(blobs) == 1:
            blob = blobs[0]
            self.fs.pipe_file(path, blob if isinstance(blob, bytes) else bytes(memoryview(blob)))
            return
        with self.fs.open(path, "wb") as fh:
            for blob in blobs:
                fh.write(memoryview(blob))

    def touch(self, key: str) -> None:
        """Mark the entry used now (LRU). Never raises: bookkeeping must not fail a read."""
        entry = self._entry(key)
        try:
            if self.is_local:
                try:
                    os.utime(os.path.join(entry, USED))
                except FileNotFoundError:
                    if os.path.exists(os.path.join(entry, MANIFEST)):
                        open(os.path.join(entry, USED), "wb").close()
            elif self.exists(key):  # no stray "used" mark for a removed entry
                self.fs.pipe_file(f"{entry}/{USED}", b"")
        except OSError as exc:
            logger.debug("prefix cache: could not mark %s used: %s", key[:12], exc)

    def delete(self, key: str) -> None:
        """Remove an entry: manifest first (the entry disappears atomically), then data."""
        entry = self._entry(key)
        if self.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(entry, MANIFEST))
            shutil.rmtree(entry, ignore_errors=True)
            return
        self._rm_quiet(f"{entry}/{MANIFEST}", recursive=False)
        self._rm_quiet(entry, recursive=True)

    def delete_if_unchanged(self, key: str, manifest_raw: bytes) -> bool:
        """Delete the entry only if its manifest still reads ``manifest_raw``.

        A reader that found an entry broken must not remove an entry another
        writer has published in its place since. Returns whether it deleted.
        """
        if self.read_manifest(key) != manifest_raw:
            return False
        self.delete(key)
        return True

    def _rm_quiet(self, path: str, recursive: bool = True) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=recursive)
        self._fresh(path)

    # ------------------------------------------------------------------ pins
    def pin(self, key: str) -> None:
        path = f"{self.root}/pins/{check_key(key)}"
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
        else:
            self.fs.pipe_file(path, b"")

    def unpin(self, key: str) -> None:
        path = f"{self.root}/pins/{check_key(key)}"
        if self.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            self._rm_quiet(path, recursive=False)

    def pinned(self) -> set[str]:
        path = f"{self.root}/pins"
        self._fresh(path)
        try:
            names = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return set()
        keys = {n.rstrip("/").rsplit("/", 1)[-1] for n in names}
        return {k for k in keys if _KEY_RE.fullmatch(k)}

    # --------------------------------------------------------------- listing
    def entries(self) -> list[StoredEntry]:
        """Every entry (complete or not) with its size and last use, one listing call."""
        base = f"{self.root}/entries"
        self._fresh(base)
        try:
            found = self.fs.find(base, detail=True)
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
            if not _KEY_RE.fullmatch(key) or not rest:
                continue
            sizes[key] = sizes.get(key, 0) + int(info.get("size") or 0)
            if rest == USED:
                used_mark[key] = _mtime(info)
            else:
                newest[key] = max(newest.get(key, 0.0), _mtime(info))
            if rest == MANIFEST:
                complete.add(key)
        pins = self.pinned()
        return [
            StoredEntry(k, sizes[k], used_mark.get(k, newest.get(k, 0.0)), k in complete, k in pins)
            for k in sizes
        ]

    def iter_orphans(self, older_than: float) -> Iterator[str]:
        """Paths that no manifest references, last written at least ``older_than``
        seconds ago: data of interrupted or losing writers, temporary manifests,
        and "used" marks of removed entries."""
        cutoff = time.time() - older_than
        base = f"{self.root}/entries"
        self._fresh(base)
        try:
            listed = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return
        for key in (p.rstrip("/").rsplit("/", 1)[-1] for p in listed):
            if not _KEY_RE.fullmatch(key):
                continue
            entry = f"{base}/{key}"
            raw = self.read_manifest(key)
            live = None
            if raw is not None:
                with contextlib.suppress(ValueError):
                    doc = json.loads(raw)
                    live = doc.get("data_dir") if isinstance(doc, dict) else None
            self._fresh(entry)
            try:
                items = self.fs.ls(entry, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile
            for item in items:
                name = item["name"].rstrip("/").rsplit("/", 1)[-1]
                if name in (MANIFEST, live) or (name == USED and raw is not None):
                    continue
                is_dir = item.get("type") == "directory"
                mtime = (
                    _dir_mtime(self.fs, item["name"])
                    if is_dir and not self.is_local
                    else (_mtime(item))
                )
                if mtime <= cutoff:
                    yield item["name"]

    def collect_garbage(self, older_than: float) -> list[str]:
        """Remove what :meth:`iter_orphans` yields, and local entry directories
        left empty. Returns the removed paths."""
        removed = list(self.iter_orphans(older_than))
        for path in removed:
            self.remove_path(path)
        if self.protocol in ("s3", "s3a"):
            removed += self._abort_stale_uploads(older_than)
        if self.is_local:
            base = os.path.join(self.root, "entries")
            with contextlib.suppress(FileNotFoundError):
                for key in os.listdir(base):
                    if _KEY_RE.fullmatch(key):
                        with contextlib.suppress(OSError):  # not empty: in use
                            os.rmdir(os.path.join(base, key))
        return removed

    def _abort_stale_uploads(self, older_than: float) -> list[str]:
        """Abort multipart uploads under this cache's root that a killed writer
        left unfinished (S3 keeps, and bills, their parts until aborted)."""
        bucket, _, prefix = self.root.partition("/")
        cutoff = time.time() - older_than
        aborted = []
        try:
            uploads = self.fs.list_multipart_uploads(bucket)
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
                self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"]
                )
                aborted.append(f"{bucket}/{key} (upload {upload['UploadId'][:12]})")
        return aborted

    def remove_path(self, path: str) -> None:
        if self.is_local and not os.path.isdir(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        self._rm_quiet(path, recursive=True)


def _check_protocol(url: str) -> str | None:
    """The URL's scheme, checked now so a typo fails at construction, not in a trial."""
    import fsspec
    from fsspec.core import split_protocol

    first: str | None = None
    for i, part in enumerate(url.split("::")):
        protocol, _ = split_protocol(part)
        if i == 0:
            first = protocol
        if protocol is None:
            continue
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise CacheConfigError(
                f"cache URL {redact_url(url)!r} has an unknown scheme {protocol!r}; give a "
                "local directory, file://..., s3://bucket/prefix, or another fsspec URL"
            ) from None
        except ImportError as exc:
            raise CacheConfigError(
                f"cache URL {redact_url(url)!r} needs the filesystem package for "
                f"{protocol!r}, which is not installed ({exc})"
            ) from None
    return first


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


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename is None:
        # s3fs: "The specified bucket does not exist" and the like
        return f"{exc} (does the bucket exist?)"
    return str(exc)


def _scrub(exc: BaseException, options: Mapping[str, Any]) -> str:
    """``str(exc)`` without any secret from ``options`` in it."""
    text = str(exc)
    for name, value in options.items():
        if (
            isinstance(value, str)
            and value
            and any(word in name.lower() for word in ("secret", "token", "password", "key"))
        ):
            text = text.replace(value, "***")
    return text


_OVERLAP_BYTES = 8 * 2**20


class _HashingWriter:
    """File wrapper that checksums (xxh3-128) and counts what passes through."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._hash = xxhash.xxh3_128()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _OVERLAP_BYTES:
            # The write syscall releases the GIL: checksum while the kernel copies.
            failure: list[BaseException] = []

            def write_all() -> None:
                try:
                    self._fh.write(view)
                except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    failure.append(exc)

            writer = threading.Thread(target=write_all, name="eeipu-cache-write")
            writer.start()
            self._hash.update(view)
            writer.join()
            if failure:
                raise failure[0]
        else:
            self._hash.update(view)
            self._fh.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:  # the owner closes the real file
        self.closed = True

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


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
