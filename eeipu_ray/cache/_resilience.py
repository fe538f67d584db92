"""Failing storage: what the storage stack raises, as the cache's own errors.

:class:`CacheUnreachableError` when a remote store does not answer (after the
retries of botocore and s3fs, bounded by the defaults in
:data:`~eeipu_ray.cache._urls.S3_DEFAULT_CONFIG` /
:data:`~eeipu_ray.cache._urls.S3_DEFAULT_RETRIES`); then for
``unreachable_cooldown`` seconds every remote call of that store fails at once
instead of waiting out the timeouts again. :class:`CacheStorageError` for
other refusals (a full disk, no permission, a missing bucket).
"""

from __future__ import annotations

import contextlib
import errno
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from eeipu_ray.cache._credentials import scrub, scrub_text
from eeipu_ray.cache._urls import redact_url
from eeipu_ray.cache.errors import CacheError, CacheStorageError, CacheUnreachableError

if TYPE_CHECKING:
    from eeipu_ray.cache.fs_store import FsStore

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


@contextlib.contextmanager
def storage_call(
    store: FsStore,
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
    local = store.is_local
    where = _entry_words(key, stage)
    if not local:
        _check_reachable(store, action, where)
    try:
        yield
    except CacheError:
        raise
    except passthrough:
        raise
    except NotImplementedError as exc:  # fsspec: a read-only filesystem (http://)
        raise CacheStorageError(
            f"prefix cache: could not {action}{where} in {redact_url(store.url)!r}: its "
            f"filesystem ({type(store._fs).__name__}) does not support this operation "
            "(a read-only scheme?); give a writable location"
        ) from exc
    except Exception as exc:
        if not from_storage_stack(exc):
            raise
        raise _translate(store, exc, action, where, local=local) from exc


def _check_reachable(store: FsStore, action: str, where: str) -> None:
    left = store._down_until - time.monotonic()
    if left > 0:
        raise CacheUnreachableError(
            f"prefix cache {redact_url(store.url)!r} is unreachable: could not {action}"
            f"{where}: {store._down_reason} (found moments ago; calls fail "
            f"at once for another {left:.0f} s, see unreachable_cooldown)"
        )


def _translate(
    store: FsStore, exc: BaseException, action: str, where: str, *, local: bool
) -> CacheStorageError:
    options = store._options()
    detail = redact_url(f"{type(exc).__name__}: {scrub(exc, options)}")
    if not local and is_unreachable(exc):
        if store.unreachable_cooldown > 0:
            store._down_until = time.monotonic() + store.unreachable_cooldown
            store._down_reason = detail
        return CacheUnreachableError(
            f"prefix cache {redact_url(store.url)!r} is unreachable: could not {action}"
            f"{where}: {detail} ({_retry_policy(store._fs)}); check the endpoint and the "
            "network, or change the retries and timeouts in storage_options"
        )
    if isinstance(exc, OSError):
        detail = redact_url(scrub_text(_describe_os_error(exc), options))
    return CacheStorageError(
        f"prefix cache: could not {action}{where} in {redact_url(store.url)!r}: {detail}"
    )


def _retry_policy(fs: Any) -> str:
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


def from_storage_stack(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage failure (an ``OSError``, or raised by the
    storage libraries: botocore, s3fs, aiohttp, ...), not a bug of ours."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__module__.split(".", 1)[0] in _STORAGE_PACKAGES


def is_unreachable(exc: BaseException) -> bool:
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


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename is None:
        # s3fs: "The specified bucket does not exist" and the like
        return f"{exc} (does the bucket exist?)"
    if exc.errno in _NO_SPACE_ERRNOS:
        return f"{exc} (no room left: free space, lower byte_budget or move the cache)"
    return str(exc)
