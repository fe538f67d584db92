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
Publishing is atomic (:mod:`eeipu_ray.cache._publish`); what a writer that died
leaves behind is invisible to readers and removed by
:meth:`FsStore.collect_garbage` (:mod:`eeipu_ray.cache._gc`). Every operation
raises the cache's own errors, never the storage library's
(:mod:`eeipu_ray.cache._resilience`).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from eeipu_ray.cache import _gc
from eeipu_ray.cache._credentials import Credentials, merge_secrets, scrub, split_secrets
from eeipu_ray.cache._gc import StoredEntry
from eeipu_ray.cache._layout import KEY_RE, MANIFEST, USED
from eeipu_ray.cache._publish import ManifestFor, Parts, Published, publish
from eeipu_ray.cache._resilience import (
    DEFAULT_UNREACHABLE_COOLDOWN,
    from_storage_stack,
    storage_call,
)
from eeipu_ray.cache._urls import (
    S3_DEFAULT_CONFIG,
    S3_DEFAULT_RETRIES,
    check_url,
    redact_url,
    with_s3_defaults,
)
from eeipu_ray.cache.errors import (
    CacheConfigError,
    CacheError,
    CacheStorageError,
    CacheUnreachableError,
)
from eeipu_ray.keys import check_key

__all__ = [
    "DEFAULT_UNREACHABLE_COOLDOWN",
    "MANIFEST",
    "S3_DEFAULT_CONFIG",
    "S3_DEFAULT_RETRIES",
    "USED",
    "CacheConfigError",
    "CacheError",
    "CacheStorageError",
    "CacheUnreachableError",
    "FsStore",
    "StoredEntry",
    "redact_url",
]

logger = logging.getLogger("eeipu_ray.cache")

_LOCAL_PROTOCOLS = ("file", "local")


class FsStore:
    """Low-level entry storage on an fsspec filesystem.

    Args:
        url: A local path, ``file://...``, ``s3://bucket/prefix`` or any fsspec URL.
        storage_options: Passed to fsspec (for S3: ``endpoint_url``, ``key``,
            ``secret``, ``client_kwargs={"region_name": ...}``, ...). Without
            them s3fs reads the usual AWS environment (``AWS_ACCESS_KEY_ID``,
            ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
            ``AWS_PROFILE``). Never logged or shown.

            For ``s3://``: ``retries`` (s3fs's attempts per call) and
            ``config_kwargs`` (botocore: ``retries``, ``connect_timeout``,
            ``read_timeout``) bound how long a call waits on a failing
            endpoint; unset ones take :data:`S3_DEFAULT_RETRIES` and
            :data:`S3_DEFAULT_CONFIG`.
        unreachable_cooldown: Seconds during which, after a remote store was
            found unreachable, calls fail at once with
            :class:`CacheUnreachableError` instead of waiting out the timeouts
            again; ``0`` asks the store every time.

    Raises:
        CacheConfigError: for an empty URL, an unknown scheme, a scheme whose
            filesystem package is not installed, an S3 URL without a valid
            bucket or with credentials in it, or ``.``/``..`` in a URL's path.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        unreachable_cooldown: float = DEFAULT_UNREACHABLE_COOLDOWN,
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
        self.protocol = check_url(self.url)
        self.unreachable_cooldown = float(unreachable_cooldown)
        self._fs: Any = None
        self._root: str | None = None
        self._local: bool | None = None
        self._conditional_put: bool | None = None  # learned on the first publish
        self._down_until = 0.0  # monotonic time until which remote calls fail at once
        self._down_reason = ""
        # Credentials in storage_options never travel in a pickle (Tune writes the
        # trainable and the searcher, which hold the cache, to tuner.pkl): a
        # pickle carries this reference; see Credentials.
        self._credentials_ref: str | None = None

    # fsspec filesystems hold clients and sockets; rebuild them after unpickling.
    def __getstate__(self) -> dict[str, Any]:
        state = {
            **self.__dict__,
            "_fs": None,
            "_root": None,
            "_local": None,
            "_down_until": 0.0,
            "_down_reason": "",
        }
        public, secret = split_secrets(self.storage_options)
        if secret:
            if self._credentials_ref is None:
                self._credentials_ref = uuid.uuid4().hex
            Credentials.share(self._credentials_ref, secret)
            state["storage_options"] = public
            state["_credentials_ref"] = self._credentials_ref
        return state

    def _options(self) -> dict[str, Any]:
        """``storage_options`` with the credentials an unpickled copy left behind."""
        options = dict(self.storage_options)
        ref = self._credentials_ref
        if ref is None or split_secrets(options)[1]:
            return options
        secret = Credentials.find(ref)
        if secret is None:
            logger.warning(
                "prefix cache %r: the credentials given in its storage_options are not "
                "available in this process (they never travel in pickles; Ray workers get "
                "them from the cluster that ran the driver); using the environment's "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, an instance profile, ...)",
                redact_url(self.url),
            )
            self._credentials_ref = None  # warned once; nothing left to carry
            return options
        self.storage_options = merge_secrets(options, secret)
        return dict(self.storage_options)

    def __repr__(self) -> str:  # never shows storage_options (credentials)
        return f"FsStore({redact_url(self.url)!r})"

    def _open_fs(self) -> None:
        import fsspec

        options = self._options()
        s3_retries = None
        if self.protocol not in (None, *_LOCAL_PROTOCOLS):
            # Other processes write the same bucket: a cached listing would show
            # entries they removed and hide entries they added.
            options.setdefault("use_listings_cache", False)
            if self.protocol in ("s3", "s3a"):
                options, s3_retries = with_s3_defaults(options)
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ValueError, ImportError, TypeError) as exc:
            raise CacheConfigError(
                f"cannot open cache URL {redact_url(self.url)!r}: {scrub(exc, options)}"
            ) from None
        except Exception as exc:
            if not from_storage_stack(exc):
                raise
            raise CacheConfigError(
                f"cannot open cache URL {redact_url(self.url)!r}: "
                f"{type(exc).__name__}: {scrub(exc, options)}"
            ) from None
        if s3_retries is not None:
            fs.retries = s3_retries  # an instance of its own (skip_instance_cache)
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

    # ------------------------------------------------------- failing storage
    def _storage_call(
        self,
        action: str,
        key: str | None = None,
        *,
        stage: str | None = None,
        passthrough: tuple[type, ...] = (),
    ) -> contextlib.AbstractContextManager[None]:
        """A context that raises the cache's errors for what storage raises in it
        (see :func:`eeipu_ray.cache._resilience.storage_call`)."""
        return storage_call(self, action, key, stage=stage, passthrough=passthrough)

    # ----------------------------------------------------------------- paths
    def _entry(self, key: str) -> str:
        return f"{self.root}/entries/{check_key(key)}"

    def _data_path(self, key: str, data_dir: str, part: str) -> str:
        return f"{self._entry(key)}/{data_dir}/{part}"

    # ----------------------------------------------------------------- reads
    def read_manifest(self, key: str) -> bytes | None:
        """The manifest's bytes, or ``None`` when the entry does not exist.

        A file where a directory of the path should be (``ENOTDIR``) means no
        entry there, as a missing file does; writing there fails loudly.
        """
        path = f"{self._entry(key)}/{MANIFEST}"
        with self._storage_call("read the manifest of", key):
            try:
                if self.is_local:
                    with open(path, "rb") as fh:
                        return fh.read()
                return self.fs.cat_file(path)
            except (FileNotFoundError, NotADirectoryError):
                return None

    def read_part(self, key: str, data_dir: str, part: str) -> Any:
        """The part's bytes as a buffer; local files are memory-mapped (zero copy).

        Raises:
            FileNotFoundError: the part is missing.
            CacheStorageError: the storage failed (:class:`CacheUnreachableError`:
                it did not answer).
        """
        path = self._data_path(key, data_dir, part)
        with self._storage_call(f"read part {part!r} of", key, passthrough=(FileNotFoundError,)):
            if self.is_local:
                with open(path, "rb") as fh:
                    if os.fstat(fh.fileno()).st_size == 0:
                        return b""
                    # Private (copy-on-write) mapping: zero-copy, yet writable, so a
                    # stage may modify a loaded input in place without touching the file.
                    return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            return self.fs.cat_file(path)

    def exists(self, key: str) -> bool:
        if self.is_local:
            return self._has_manifest(key)
        with self._storage_call("look up", key):
            return self._has_manifest(key)

    def _has_manifest(self, key: str) -> bool:
        """Whether the entry's manifest exists; storage errors untranslated."""
        path = f"{self._entry(key)}/{MANIFEST}"
        if self.is_local:
            return os.path.exists(path)
        self._fresh(path)
        return bool(self.fs.exists(path))

    # ---------------------------------------------------------------- writes
    def publish(
        self,
        key: str,
        parts: Parts,
        manifest_for: ManifestFor,
        *,
        stage: str | None = None,
    ) -> Published:
        """Write ``parts`` and then the manifest.

        Sizes and checksums are computed while the data is written (local files
        are written straight from the codec's stream through a hashing wrapper).
        ``manifest_for(data_dir, files)`` returns the manifest bytes.

        Returns:
            ``(published, data_dir, files)``; ``published`` is False when another
            writer's entry for the same key won (its entry stays, this writer's
            data is removed).

        Raises:
            CacheStorageError: the backend refused the write (naming the key
                and ``stage``); nothing of this writer stays visible.
        """
        data_dir = f"d-{uuid.uuid4().hex}"
        with self._storage_call("write", key, stage=stage):
            return publish(self, key, data_dir, parts, manifest_for)

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
                with self._storage_call("mark used", key):
                    self.fs.pipe_file(f"{entry}/{USED}", b"")
        except OSError as exc:  # CacheStorageError included
            logger.debug("prefix cache: could not mark %s used: %s", key[:12], exc)

    def delete(self, key: str) -> None:
        """Remove an entry: manifest first (the entry disappears atomically), then data."""
        entry = self._entry(key)
        with self._storage_call("delete", key):
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
        with self._storage_call("pin", key):
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "wb").close()
            else:
                self.fs.pipe_file(path, b"")

    def unpin(self, key: str) -> None:
        path = f"{self.root}/pins/{check_key(key)}"
        with self._storage_call("unpin", key):
            if self.is_local:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            else:
                self._rm_quiet(path, recursive=False)

    def pinned(self) -> set[str]:
        path = f"{self.root}/pins"
        with self._storage_call("list the pins"):
            self._fresh(path)
            try:
                names = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return set()
        keys = {n.rstrip("/").rsplit("/", 1)[-1] for n in names}
        return {k for k in keys if KEY_RE.fullmatch(k)}

    # ------------------------------------------------- listing and garbage
    def entries(self) -> list[StoredEntry]:
        """Every entry (complete or not) with its size and last use, one listing call."""
        return _gc.entries(self)

    def iter_orphans(self, older_than: float) -> Iterator[str]:
        """Paths that no manifest references, last written at least ``older_than``
        seconds ago (see :func:`eeipu_ray.cache._gc.iter_orphans`)."""
        return _gc.iter_orphans(self, older_than)

    def collect_garbage(self, older_than: float) -> list[str]:
        """Remove what :meth:`iter_orphans` yields (and, on S3, unfinished
        multipart uploads); returns the removed paths."""
        return _gc.collect_garbage(self, older_than)

    def remove_path(self, path: str) -> None:
        with self._storage_call(f"remove {path!r} from"):
            if self.is_local and not os.path.isdir(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return
            self._rm_quiet(path, recursive=True)
