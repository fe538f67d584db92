"""Credentials in ``storage_options``: kept out of pickles (shared through this
process and Ray's internal key-value store instead) and out of error messages."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from typing import Any


def is_secret_option(name: Any) -> bool:
    return any(word in str(name).lower() for word in ("secret", "token", "password", "key"))


def split_secrets(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(public, secret)``: ``options`` without, and only, the values under
    credential-like names (one level of nested mappings: ``client_kwargs``)."""
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, Mapping):
            inner_public, inner_secret = split_secrets(value)
            public[name] = inner_public
            if inner_secret:
                secret[name] = inner_secret
        elif is_secret_option(name) and isinstance(value, str) and value:
            secret[name] = value
        else:
            public[name] = value
    return public, secret


def merge_secrets(public: Mapping[str, Any], secret: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(public)
    for name, value in secret.items():
        if isinstance(value, Mapping):
            merged[name] = merge_secrets(merged.get(name) or {}, value)
        else:
            merged[name] = value
    return merged


class Credentials:
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


def scrub(exc: BaseException, options: Mapping[str, Any]) -> str:
    """``str(exc)`` without any secret from ``options`` in it."""
    return scrub_text(str(exc), options)


def scrub_text(text: str, options: Mapping[str, Any]) -> str:
    """``text`` without any secret from ``options`` (nested mappings included,
    e.g. ``client_kwargs={"aws_secret_access_key": ...}``) in it."""
    for name, value in options.items():
        if isinstance(value, Mapping):
            text = scrub_text(text, value)
        elif isinstance(value, str) and value and is_secret_option(name):
            text = text.replace(value, "***")
    return text
