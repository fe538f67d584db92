"""Durable cache storage on any fsspec filesystem: a local directory, ``s3://``, ...

Layout under the root::

    entries/<key>/manifest.json      written last: the entry exists once it exists
    entries/<key>/d-<token>/<part>   the data, one file per encoded part
    entries/<key>/used               touched on every use (its mtime drives LRU)
    pins/<key>                       present while the searcher protects the prefix
    tmp/                             local publishing scratch

Keys are checked (64 hex characters) before they touch a path, and part names
are checked by the codec registry, so nothing a hyperparameter holds can steer a
write outside the root.

Publishing is atomic:

* local directory: data is written into a fresh ``d-<token>`` directory, the
  manifest into a temporary file, and the manifest is linked into place with
  ``os.link``, which fails if another writer won; the loser removes its data.
* object stores (S3): data objects first, the manifest last as one PUT (S3
  PUTs are atomic). If two writers race, both entries are complete and valid;
  the last manifest wins and the other writer removes its now unreferenced data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from eeipu_ray.cache.codecs import PartData, iter_blobs
from eeipu_ray.errors import CacheConfigError
from eeipu_ray.pipeline.keys import check_key

logger = logging.getLogger("eeipu_ray.cache")

MANIFEST = "manifest.json"
USED = "used"


@dataclass(frozen=True)
class StoredEntry:
    """One entry as seen by a listing."""

    key: str
    bytes: int
    last_used: float
    complete: bool  # has a manifest
    pinned: bool = False


class FsStore:
    """Low-level entry storage on an fsspec filesystem.

    Args:
        url: A local path, ``file://...``, ``s3://bucket/prefix`` or any fsspec URL.
        storage_options: Passed to fsspec (for S3: ``endpoint_url``, ``key``,
            ``secret``, ``client_kwargs={"region_name": ...}``, ...). Without
            them s3fs reads the usual AWS environment (``AWS_ACCESS_KEY_ID``,
            ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
            ``AWS_PROFILE``).
    """

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None):
        self.url = os.fspath(url)
        if not self.url:
            raise CacheConfigError("cache URL is empty; give a directory or an s3:// URL")
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        self._root: str | None = None

    # fsspec filesystems hold clients and sockets; rebuild them after unpickling.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_root": None}

    def __repr__(self) -> str:  # never shows storage_options (credentials)
        return f"FsStore({self.url!r})"

    def _open_fs(self) -> None:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except (ValueError, ImportError, TypeError) as exc:
            raise CacheConfigError(f"cannot open cache URL {self.url!r}: {exc}") from exc
        self._fs, self._root = fs, root.rstrip("/")
        if self.is_local:
            os.makedirs(self._root, exist_ok=True)

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
        fs = self.fs
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return protocol in ("file", "local")

    # ----------------------------------------------------------------- paths
    def _entry(self, key: str) -> str:
        return f"{self.root}/entries/{check_key(key)}"

    def _data_path(self, key: str, data_dir: str, part: str) -> str:
        return f"{self._entry(key)}/{data_dir}/{part}"

    # ----------------------------------------------------------------- reads
    def read_manifest(self, key: str) -> bytes | None:
        path = f"{self._entry(key)}/{MANIFEST}"
        try:
            if self.is_local:
                with open(path, "rb") as fh:
                    return fh.read()
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def read_part(self, key: str, data_dir: str, part: str) -> Any:
        """The part's bytes as a buffer; local files are memory-mapped (zero copy)."""
        path = self._data_path(key, data_dir, part)
        if self.is_local:
            import pyarrow as pa

            size = os.path.getsize(path)
            if size == 0:
                return b""
            with pa.memory_map(path, "r") as mm:
                return mm.read_buffer()
        return self.fs.cat_file(path)

    def exists(self, key: str) -> bool:
        path = f"{self._entry(key)}/{MANIFEST}"
        return os.path.exists(path) if self.is_local else self.fs.exists(path)

    # ---------------------------------------------------------------- writes
    def publish(self, key: str, parts: Mapping[str, PartData], manifest_for: Any) -> tuple[bool, str]:
        """Write ``parts`` and then the manifest. ``manifest_for(data_dir)`` returns
        the manifest bytes. Returns ``(published, data_dir)``; ``published`` is
        False when another writer's entry for the same key won."""
        data_dir = f"d-{uuid.uuid4().hex}"
        entry = self._entry(key)
        if self.is_local:
            return self._publish_local(entry, data_dir, parts, manifest_for)
        if self.fs.exists(f"{entry}/{MANIFEST}"):
            return False, data_dir
        try:
            for name, data in parts.items():
                self._write_remote(f"{entry}/{data_dir}/{name}", data)
            self.fs.pipe_file(f"{entry}/{MANIFEST}", manifest_for(data_dir))
        except BaseException:
            self._rm_quiet(f"{entry}/{data_dir}")
            raise
        self.fs.pipe_file(f"{entry}/{USED}", b"")
        with contextlib.suppress(FileNotFoundError):
            # A racing writer may have replaced our manifest: then our data is
            # unreferenced and ours to remove.
            import json

            if json.loads(self.fs.cat_file(f"{entry}/{MANIFEST}")).get("data_dir") != data_dir:
                self._rm_quiet(f"{entry}/{data_dir}")
                return False, data_dir
        return True, data_dir

    def _publish_local(self, entry: str, data_dir: str, parts: Mapping[str, PartData],
                       manifest_for: Any) -> tuple[bool, str]:
        final = os.path.join(entry, MANIFEST)
        if os.path.exists(final):
            return False, data_dir
        data_path = os.path.join(entry, data_dir)
        tmp_manifest = os.path.join(entry, f".{data_dir}.manifest.tmp")
        try:
            os.makedirs(data_path)
            for name, data in parts.items():
                path = os.path.join(data_path, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    for blob in iter_blobs(data):
                        fh.write(blob)
            with open(tmp_manifest, "wb") as fh:
                fh.write(manifest_for(data_dir))
            try:
                os.link(tmp_manifest, final)  # atomic; fails if another writer won
                won = True
            except FileExistsError:
                won = False
        except BaseException:
            shutil.rmtree(data_path, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_manifest)
        if not won:
            shutil.rmtree(data_path, ignore_errors=True)
            return False, data_dir
        Path(entry, USED).touch()
        return True, data_dir

    def _write_remote(self, path: str, data: PartData) -> None:
        blobs = iter_blobs(data)
        if len(blobs) == 1:
            self.fs.pipe_file(path, bytes(memoryview(blobs[0])) if not isinstance(
                blobs[0], bytes) else blobs[0])
            return
        with self.fs.open(path, "wb") as fh:
            for blob in blobs:
                fh.write(memoryview(blob))

    def touch(self, key: str) -> None:
        path = f"{self._entry(key)}/{USED}"
        try:
            if self.is_local:
                Path(path).touch()
            else:
                self.fs.pipe_file(path, b"")
        except OSError as exc:  # LRU bookkeeping must never fail a read
            logger.debug("could not mark %s used: %s", key[:12], exc)

    def delete(self, key: str) -> None:
        """Remove an entry: manifest first (the entry disappears atomically), then data."""
        entry = self._entry(key)
        if self.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(entry, MANIFEST))
            shutil.rmtree(entry, ignore_errors=True)
            return
        self._rm_quiet(f"{entry}/{MANIFEST}")
        self._rm_quiet(entry, recursive=True)

    def _rm_quiet(self, path: str, recursive: bool = True) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=recursive)

    # ------------------------------------------------------------------ pins
    def pin(self, key: str) -> None:
        path = f"{self.root}/pins/{check_key(key)}"
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Path(path).touch()
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
        try:
            names = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return set()
        return {n.rstrip("/").rsplit("/", 1)[-1] for n in names}

    # --------------------------------------------------------------- listing
    def entries(self) -> list[StoredEntry]:
        """Every entry (complete or not) with its size and last use, one listing call."""
        base = f"{self.root}/entries"
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        sizes: dict[str, int] = {}
        used_mark: dict[str, float] = {}
        newest: dict[str, float] = {}
        complete: set[str] = set()
        for path, info in found.items():
            key, _, rest = path.split("/entries/", 1)[-1].partition("/")
            if len(key) != 64:
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
        """Paths of unreferenced data directories and temp files older than ``older_than`` s."""
        import json

        cutoff = time.time() - older_than
        base = f"{self.root}/entries"
        try:
            keys = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        except FileNotFoundError:
            return
        for key in keys:
            if len(key) != 64:
                continue
            entry = f"{base}/{key}"
            raw = self.read_manifest(key)
            live = None
            if raw is not None:
                with contextlib.suppress(ValueError):
                    live = json.loads(raw).get("data_dir")
            for item in self.fs.ls(entry, detail=True):
                name = item["name"].rstrip("/").rsplit("/", 1)[-1]
                if name in (MANIFEST, USED) or name == live:
                    continue
                is_dir = item.get("type") == "directory"
                mtime = _dir_mtime(self.fs, item["name"]) if is_dir and not self.is_local else (
                    _mtime(item))
                if mtime < cutoff:
                    yield item["name"]

    def remove_path(self, path: str) -> None:
        self._rm_quiet(path, recursive=True)


def _mtime(info: Mapping[str, Any]) -> float:
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
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
