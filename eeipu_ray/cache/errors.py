"""Error types of the prefix cache.

All derive from :class:`eeipu_ray.errors.CacheError` (and so from
:class:`~eeipu_ray.errors.EEIPUError`): a caller can tell "the cache refused
this" from a crash. The storage errors are :class:`OSError` too, so code that
catches ``OSError`` around storage keeps working.
"""

from __future__ import annotations

from eeipu_ray.errors import (
    CacheConfigError,
    CacheError,
    CacheIntegrityError,
    CacheStorageError,
    CodecError,
)


class CacheUnreachableError(CacheStorageError):
    """The cache's storage did not answer: connections refused, reset or closed
    without a response, timeouts, or server errors (503 ``SlowDown``, 500) that
    outlasted the configured retries; or it did so moments ago and calls fail
    at once for a cool-down period (``PrefixCache(unreachable_cooldown=...)``).

    The message names the cache URL (credentials masked), the entry and the
    operation. Nothing this call wrote is visible as an entry: data objects a
    failed write may have left behind have no manifest and are removed by
    ``cache.gc()``.
    """


__all__ = [
    "CacheConfigError",
    "CacheError",
    "CacheIntegrityError",
    "CacheStorageError",
    "CacheUnreachableError",
    "CodecError",
]
