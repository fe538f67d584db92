"""Cache URLs: checked at construction, shown without credentials, and the
bounded-retry defaults of ``s3://`` caches."""

from __future__ import annotations

import os
import re
from typing import Any

from eeipu_ray.cache.errors import CacheConfigError

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
#: S3 bucket names as botocore accepts them (AWS is stricter for new buckets).
_BUCKET_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


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


def check_url(url: str) -> str | None:
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
        hint = " (pip install 'eeipu-ray[s3]')" if protocol in ("s3", "s3a") else ""
        raise CacheConfigError(
            f"cache URL {shown!r} needs the filesystem package for "
            f"{protocol!r}, which is not installed{hint}: {exc}"
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


def with_s3_defaults(options: dict[str, Any]) -> tuple[dict[str, Any], int]:
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
