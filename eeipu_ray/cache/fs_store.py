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

Failing storage: every operation raises the cache's own errors, never the
storage library's. :class:`CacheUnreachableError` when a remote store does not
answer (after the retries of botocore and s3fs, bounded by the defaults in
:data:`S3_DEFAULT_CONFIG` / :data:`S3_DEFAULT_RETRIES`), then for
``unreachable_cooldown`` seconds every remote call fails at once instead of
waiting out the timeouts again; :class:`CacheStorageError` for other refusals
(a full disk, no permission, a missing bucket). A write that fails because the
store became unreachable does not try to remove its data objects (that would
wait out the timeouts once more): they have no manifest, stay invisible, and
``collect_garbage`` removes them.
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
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import xxhash

from eeipu_ray.cache.codecs import PartData, iter_blobs, write_part
from eeipu_ray.cache.errors import (
    CacheConfigError,
    CacheError,
    CacheStorageError,
    CacheUnreachableError,
)
from eeipu_ray.cache.manifest import FileRecord, checksum
from eeipu_ray.pipeline.keys import check_key

logger = logging.getLogger("eeipu_ray.cache")

MANIFEST = "manifest.json"
USED = "used"

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_LOCAL_PROTOCOLS = ("file", "local")
#: Object stores whose PUT takes ``If-None-Match: *`` through s3fs ``mode="create"``.
_CONDITIONAL_PUT_PROTOCOLS = ("s3", "s3a")

#: botocore client settings of ``s3://`` caches, each used only where
#: ``storage_options["config_kwargs"]`` (and, for the retries, the
#: ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` environment) leaves it unset:
#: "standard" retries (exponential backoff with jitter on connection errors,
#: timeouts, throttling and 5xx), 3 attempts per request (``max_attempts`` counts
#: the retries), and the socket timeouts s3fs uses.
S3_DEFAULT_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 15,
    "retries": {"mode": "standard", "max_attempts": 2},
}
#: s3fs's own attempts per call (``storage_options["retries"]``), around
#: botocore's: it also re-reads a body cut off mid-transfer. s3fs defaults to 5,
#: which multiplied with botocore's legacy 5 makes 25 attempts per call.
S3_DEFAULT_RETRIES = 2
#: Seconds a remote store found unreachable is not asked again (calls fail at once).
DEFAULT_UNREACHABLE_COOLDOWN = 30.0
#: Roots of the packages whose exceptions a storage call translates.
_STORAGE_PACKAGES = frozenset(
    {
        "botocore",
        "aiobotocore",
        "s3fs",
        "fsspec",
        "aiohttp",
        "urllib3",
        "pyarrow",
        "gcsfs",
        "adlfs",
        "google",
        "azure",
    }
)
_UNREACHABLE_ERRNOS = frozenset(
    {
        errno.EBUSY,  # s3fs: 503 SlowDown / ServiceUnavailable after its retries
        getattr(errno, "EREMOTEIO", -1),  # s3fs: 500 InternalError
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
    }
)
#: A full disk, a quota, a file size limit (RLIMIT_FSIZE).
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: S3 bucket names as botocore accepts them (AWS is stricter for new buckets).
_BUCKET_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


@dataclass(frozen=True)
class StoredEntry:
    """One entry as seen by a listing."""

    key: str
    bytes: int
    last_used: float
    complete: bool  # has a manifest
    pinned: bool = False


def redact_url(url: str) -> str:
    """``url`` without credentials written into it (``s3://KEY:SECRET@bucket``).

    A secret may hold ``@`` and ``/`` (AWS secret keys often hold ``/``): the
    mask runs to the last ``@`` of the authority, or, when the part before an
    ``@`` further on holds a ``:`` ahead of its first ``/``, to that ``@``.
    Masking too much only shortens what is shown; masking too little leaks.
    """
    return "::".join(_redact_one(part) for part in url.split("::"))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cut = -1
    for i, char in enumerate(rest):
        if char != "@":
            continue
        before = rest[:i]
        if "/" not in before or ":" in before.split("/", 1)[0]:
            cut = i
    if cut < 0:
        return url
    return f"{scheme}://***{rest[cut:]}"


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
        self.protocol = _check_url(self.url)
        self.unreachable_cooldown = float(unreachable_cooldown)
        self._fs: Any = None
        self._root: str | None = None
        self._local: bool | None = None
        self._conditional_put: bool | None = None  # learned on the first publish
        self._down_until = 0.0  # monotonic time until which remote calls fail at once
        self._down_reason = ""
        # Credentials in storage_options never travel in a pickle (Tune writes the
        # trainable and the searcher, which hold the cache, to tuner.pkl): a
        # pickle carries this reference; see _Credentials.
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
        public, secret = _split_secrets(self.storage_options)
        if secret:
            if self._credentials_ref is None:
                self._credentials_ref = uuid.uuid4().hex
            _Credentials.share(self._credentials_ref, secret)
            state["storage_options"] = public
            state["_credentials_ref"] = self._credentials_ref
        return state

    def _options(self) -> dict[str, Any]:
        """``storage_options`` with the credentials an unpickled copy left behind."""
        options = dict(self.storage_options)
        ref = self._credentials_ref
        if ref is None or _split_secrets(options)[1]:
            return options
        secret = _Credentials.find(ref)
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
        self.storage_options = _merge_secrets(options, secret)
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
                options, s3_retries = _with_s3_defaults(options)
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ValueError, ImportError, TypeError) as exc:
            raise CacheConfigError(
                f"cannot open cache URL {redact_url(self.url)!r}: {_scrub(exc, options)}"
            ) from None
        except Exception as exc:
            if not _from_storage_stack(exc):
                raise
            raise CacheConfigError(
                f"cannot open cache URL {redact_url(self.url)!r}: "
                f"{type(exc).__name__}: {_scrub(exc, options)}"
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
    @contextlib.contextmanager
    def _storage_call(
        self,
        action: str,
        key: str | None = None,
        *,
        stage: str | None = None,
        passthrough: tuple[type, ...] = (),
    ) -> Iterator[None]:
        """Translate what the storage stack raises inside into the cache's errors.

        ``CacheError`` and the ``passthrough`` types (``FileNotFoundError`` where
        the caller gives a missing file a meaning) pass; other storage errors
        become :class:`CacheUnreachableError` (remote store not answering; opens
        the cool-down) or :class:`CacheStorageError`. Exceptions of other origin
        (bugs) pass unchanged. During a cool-down a remote call fails at once.
        """
        local = self.is_local
        where = _entry_words(key, stage)
        if not local:
            self._check_reachable(action, where)
        try:
            yield
        except CacheError:
            raise
        except passthrough:
            raise
        except NotImplementedError as exc:  # fsspec: a read-only filesystem (http://)
            raise CacheStorageError(
                f"prefix cache: could not {action}{where} in {redact_url(self.url)!r}: its "
                f"filesystem ({type(self._fs).__name__}) does not support this operation "
                "(a read-only scheme?); give a writable location"
            ) from exc
        except Exception as exc:
            if not _from_storage_stack(exc):
                raise
            raise self._translate(exc, action, where, local=local) from exc

    def _check_reachable(self, action: str, where: str) -> None:
        left = self._down_until - time.monotonic()
        if left > 0:
            raise CacheUnreachableError(
                f"prefix cache {redact_url(self.url)!r} is unreachable: could not {action}"
                f"{where}: {self._down_reason} (found moments ago; calls fail "
                f"at once for another {left:.0f} s, see unreachable_cooldown)"
            )

    def _translate(
        self, exc: BaseException, action: str, where: str, *, local: bool
    ) -> CacheStorageError:
        options = self._options()
        detail = redact_url(f"{type(exc).__name__}: {_scrub(exc, options)}")
        if not local and _is_unreachable(exc):
            if self.unreachable_cooldown > 0:
                self._down_until = time.monotonic() + self.unreachable_cooldown
                self._down_reason = detail
            return CacheUnreachableError(
                f"prefix cache {redact_url(self.url)!r} is unreachable: could not {action}"
                f"{where}: {detail} ({self._retry_policy()}); check the endpoint and the "
                "network, or change the retries and timeouts in storage_options"
            )
        if isinstance(exc, OSError):
            detail = redact_url(_scrub_text(_describe_os_error(exc), options))
        return CacheStorageError(
            f"prefix cache: could not {action}{where} in {redact_url(self.url)!r}: {detail}"
        )

    def _retry_policy(self) -> str:
        fs = self._fs
        tries = getattr(fs, "retries", None)
        config = getattr(fs, "config_kwargs", None) or {}
        retries = config.get("retries") or {}
        attempts = retries.get("total_max_attempts")
        if attempts is None and "max_attempts" in retries:
            attempts = retries["max_attempts"] + 1
        return (
            f"tried {tries} x {attempts or '?'} times, {retries.get('mode', '?')} backoff, "
            f"timeouts connect {config.get('connect_timeout', '?')} s / read "
            f"{config.get('read_timeout', '?')} s"
        )

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
        parts: Mapping[str, PartData],
        manifest_for: Callable[[str, tuple[FileRecord, ...]], bytes],
        *,
        stage: str | None = None,
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
            CacheStorageError: the backend refused the write (naming the key
                and ``stage``); nothing of this writer stays visible.
        """
        data_dir = f"d-{uuid.uuid4().hex}"
        with self._storage_call("write", key, stage=stage):
            if self.is_local:
                return self._publish_local(key, data_dir, parts, manifest_for)
            return self._publish_remote(key, data_dir, parts, manifest_for)

    def _publish_local(
        self,
        key: str,
        data_dir: str,
        parts: Mapping[str, PartData],
        manifest_for: Callable[[str, tuple[FileRecord, ...]], bytes],
    ) -> tuple[bool, str, tuple[FileRecord, ...]]:
        if self._has_manifest(key):  # cheap early exit; os.link below decides races
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
        if self._has_manifest(key):  # cheap early exit; the manifest PUT decides races
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
        except Exception as exc:
            # A store that stopped answering would make the clean-up wait out the
            # timeouts once more; the data has no manifest (invisible) and gc()
            # removes it. A retried manifest PUT may even have landed: then the
            # data belongs to a complete entry and must stay.
            if not _is_unreachable(exc):
                self._remove_quietly(data_prefix)
            raise
        if not won:
            self._remove_quietly(data_prefix)
        if won:
            with contextlib.suppress(Exception):  # LRU bookkeeping only
                self.fs.pipe_file(f"{entry}/{USED}", b"")
        return won, data_dir, tuple(files)

    def _remove_quietly(self, path: str) -> None:
        try:
            self._rm_quiet(path)
        except Exception as exc:  # never hide the original error; gc() retries later
            if not _from_storage_stack(exc):
                raise
            logger.info("prefix cache: could not remove %s: %s", path, exc)

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
        return {k for k in keys if _KEY_RE.fullmatch(k)}

    # --------------------------------------------------------------- listing
    def entries(self) -> list[StoredEntry]:
        """Every entry (complete or not) with its size and last use, one listing call."""
        base = f"{self.root}/entries"
        with self._storage_call("list the entries"):
            if self.is_local:
                found = _find_local(base)
            else:
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
        with self._storage_call("collect garbage"):
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
        with self._storage_call(f"remove {path!r} from"):
            if self.is_local and not os.path.isdir(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return
            self._rm_quiet(path, recursive=True)


def _check_url(url: str) -> str | None:
    """The URL's scheme (``None`` for a local path), checked now so a typo fails
    at construction, not in a trial; and refuse URLs that would put entries
    somewhere else than they say."""
    shown = redact_url(url)
    if "\x00" in url:
        raise CacheConfigError(f"cache URL {shown!r} contains a NUL character")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CacheConfigError(
            f"cache URL {shown!r} is not valid Unicode ({exc.reason} at position "
            f"{exc.start}): entries' paths and manifests are UTF-8"
        ) from None
    if "::" in url:
        raise CacheConfigError(
            f"cache URL {shown!r} contains '::' (an fsspec URL chain, e.g. "
            "'simplecache::s3://...'): the cache needs one filesystem it can publish "
            "entries on atomically; give a directory or an s3://bucket/prefix URL"
        )
    import fsspec
    from fsspec.core import split_protocol

    protocol, path = split_protocol(url)
    if protocol is None:
        return None  # a local path: PrefixCache made it absolute (``..`` resolved)
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise CacheConfigError(
            f"cache URL {shown!r} has an unknown scheme {protocol!r}; give a "
            "local directory, file://..., s3://bucket/prefix, or another fsspec URL"
        ) from None
    except ImportError as exc:
        raise CacheConfigError(
            f"cache URL {shown!r} needs the filesystem package for "
            f"{protocol!r}, which is not installed ({exc})"
        ) from None
    if any(c in (".", "..") for c in path.split("/")):
        raise CacheConfigError(
            f"cache URL {shown!r} has '.' or '..' in its path; object stores do not "
            "resolve them the way a directory would: give the path they mean"
        )
    if protocol not in ("s3", "s3a"):
        return protocol
    authority = path.split("/", 1)[0]
    if "@" in authority or ("@" in path and redact_url(url) != url):
        raise CacheConfigError(
            f"cache URL {shown!r} has credentials in it, which s3fs does not read (it "
            "would take them for the bucket name); pass key/secret in storage_options "
            "or use the AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)"
        )
    if not authority:
        raise CacheConfigError(
            f"cache URL {shown!r} names no bucket; give s3://bucket or s3://bucket/prefix"
        )
    if not _BUCKET_RE.fullmatch(authority):
        raise CacheConfigError(
            f"cache URL {shown!r}: {authority!r} is not a valid S3 bucket name "
            "(letters, digits, '.', '-' and '_'; up to 255 characters)"
        )
    return protocol


def _with_s3_defaults(options: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """``options`` with the bounded-retry defaults filled in where unset, and
    s3fs's attempts per call (an attribute, not a constructor option, of s3fs)."""
    options = dict(options)
    retries = options.pop("retries", S3_DEFAULT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
        raise CacheConfigError(
            f"storage_options['retries'] (s3fs attempts per call) must be an int >= 1, "
            f"got {retries!r}"
        )
    config = dict(options.get("config_kwargs") or {})
    for name in ("connect_timeout", "read_timeout"):
        config.setdefault(name, S3_DEFAULT_CONFIG[name])
    botocore_retries = dict(config.get("retries") or {})
    if "mode" not in botocore_retries and not os.environ.get("AWS_RETRY_MODE"):
        botocore_retries["mode"] = S3_DEFAULT_CONFIG["retries"]["mode"]
    if not {"max_attempts", "total_max_attempts"} & set(botocore_retries) and not os.environ.get(
        "AWS_MAX_ATTEMPTS"
    ):
        botocore_retries["max_attempts"] = S3_DEFAULT_CONFIG["retries"]["max_attempts"]
    if botocore_retries:
        config["retries"] = botocore_retries
    options["config_kwargs"] = config
    # An instance of our own: ``retries`` is set on it after construction.
    options.setdefault("skip_instance_cache", True)
    return options, retries


def _from_storage_stack(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage failure (an ``OSError``, or raised by the
    storage libraries: botocore, s3fs, aiohttp, ...), not a bug of ours."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__module__.split(".", 1)[0] in _STORAGE_PACKAGES


def _is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store did not answer (or kept failing server-side)."""
    if isinstance(exc, ConnectionError | TimeoutError):  # builtins; FSTimeoutError too
        return True
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return True
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None and isinstance(
        exc, botocore.ConnectionError | botocore.HTTPClientError
    ):
        return True
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(
        exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError
    )


def _entry_words(key: str | None, stage: str | None = None) -> str:
    words = f" entry {key[:12]}" if key else ""
    return f"{words} (stage {stage!r})" if stage else words


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
    if exc.errno in _NO_SPACE_ERRNOS:
        return f"{exc} (no room left: free space, lower byte_budget or move the cache)"
    return str(exc)


def _is_secret_option(name: Any) -> bool:
    return any(word in str(name).lower() for word in ("secret", "token", "password", "key"))


def _split_secrets(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(public, secret)``: ``options`` without, and only, the values under
    credential-like names (one level of nested mappings: ``client_kwargs``)."""
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, Mapping):
            inner_public, inner_secret = _split_secrets(value)
            public[name] = inner_public
            if inner_secret:
                secret[name] = inner_secret
        elif _is_secret_option(name) and isinstance(value, str) and value:
            secret[name] = value
        else:
            public[name] = value
    return public, secret


def _merge_secrets(public: Mapping[str, Any], secret: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(public)
    for name, value in secret.items():
        if isinstance(value, Mapping):
            merged[name] = _merge_secrets(merged.get(name) or {}, value)
        else:
            merged[name] = value
    return merged


class _Credentials:
    """Where the credentials of pickled caches wait for their unpickled copies:
    this process's memory, and (when this process is connected to Ray) the Ray
    cluster's internal key-value store, which every worker of the cluster can
    read. A pickle only names them, so neither ``tuner.pkl`` nor a searcher
    checkpoint holds a secret; a driver restored on a new cluster passes the
    cache again (or relies on the environment's credentials)."""

    _NAMESPACE = "eeipu_ray_credentials"
    _local: dict[str, dict[str, Any]] = {}  # process-wide on purpose
    _in_ray: set[tuple[str, str]] = set()  # (ref, Ray job) this process put into the KV

    @classmethod
    def share(cls, ref: str, secret: dict[str, Any]) -> None:
        cls._local[ref] = secret
        kv = cls._kv()
        if kv is None:
            return
        put, _, job = kv
        if (ref, job) in cls._in_ray:  # a cache is pickled for every task that takes it
            return
        put(
            f"{cls._NAMESPACE}/{ref}".encode(),
            json.dumps(secret).encode(),
            True,
            namespace=cls._NAMESPACE,
        )
        cls._in_ray.add((ref, job))

    @classmethod
    def find(cls, ref: str) -> dict[str, Any] | None:
        if ref in cls._local:
            return cls._local[ref]
        kv = cls._kv()
        if kv is None:
            return None
        _, get, _ = kv
        raw = get(f"{cls._NAMESPACE}/{ref}".encode(), namespace=cls._NAMESPACE)
        if raw is None:
            return None
        cls._local[ref] = json.loads(raw)
        return cls._local[ref]

    @staticmethod
    def _kv() -> tuple[Callable[..., Any], Callable[..., Any], str] | None:
        """Ray's internal KV put and get, and the Ray job (a new connection to a
        cluster, maybe a new cluster, is a new job); ``None`` without Ray."""
        if "ray" not in sys.modules:  # never import Ray for this
            return None
        try:
            import ray
            from ray.experimental import internal_kv
        except ImportError:
            return None
        if not internal_kv._internal_kv_initialized():
            return None
        job = ray.get_runtime_context().get_job_id()
        return internal_kv._internal_kv_put, internal_kv._internal_kv_get, job


def _scrub(exc: BaseException, options: Mapping[str, Any]) -> str:
    """``str(exc)`` without any secret from ``options`` in it."""
    return _scrub_text(str(exc), options)


def _scrub_text(text: str, options: Mapping[str, Any]) -> str:
    """``text`` without any secret from ``options`` (nested mappings included,
    e.g. ``client_kwargs={"aws_secret_access_key": ...}``) in it."""
    for name, value in options.items():
        if isinstance(value, Mapping):
            text = _scrub_text(text, value)
        elif isinstance(value, str) and value and _is_secret_option(name):
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
