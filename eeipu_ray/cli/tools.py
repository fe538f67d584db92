"""``eeipu-ray report`` and ``eeipu-ray cache``: reports of experiments, cache upkeep."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from eeipu_ray.cli._common import UsageError


def cmd_report(args: argparse.Namespace) -> int:
    from eeipu_ray.report import ExperimentDirError, write_report

    try:
        files = write_report(
            Path(args.experiment_dir),
            args.out,
            metric=args.metric,
            mode=args.mode,
            budget=args.budget,
            n_warmup=args.warmup,
        )
    except ExperimentDirError as exc:
        raise UsageError(str(exc)) from exc
    print(f"report: {files.markdown}")
    print(f"report: {files.html}")
    for path in files.images.values():
        print(f"plot: {path}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from eeipu_ray.errors import CacheError

    cache = open_existing_cache(args.url)
    try:
        _cache_action(cache, args)
    except CacheError as exc:  # the storage failed under the command
        print(f"eeipu-ray cache {args.action}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cache_action(cache: Any, args: argparse.Namespace) -> None:
    if args.action == "stats":
        print(json.dumps(cache.stats(), indent=2, default=str))
    elif args.action == "ls":
        for e in sorted(cache.entries(), key=lambda e: e.last_used):
            m = cache.manifest(e.key) if e.complete else None
            stage = "/".join(m.meta.stage_names) if m else "(incomplete)"
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
            print(f"{e.key[:16]}  {e.bytes:>12d}  {used}  {'pinned ' if e.pinned else ''}{stage}")
    elif args.action == "gc":
        removed = cache.gc(older_than=args.older_than)
        evicted = cache.evict(args.max_bytes) if args.max_bytes is not None else []
        print(
            f"removed {len(removed)} leftovers of interrupted writes; "
            f"evicted {len(evicted)} entries"
        )


def open_existing_cache(url: str) -> Any:
    """The prefix cache at ``url``, which must exist: inspecting a cache never
    creates one (``PrefixCache`` makes a missing local directory).

    Raises:
        UsageError: no directory (or, for a remote URL, nothing) at ``url``, or
            a URL the cache cannot open.
    """
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.errors import CacheError

    local = _local_path(url)
    if local is not None:
        if not os.path.exists(local):
            raise UsageError(f"no cache at {url}: the directory does not exist")
        if not os.path.isdir(local):
            raise UsageError(f"no cache at {url}: not a directory")
    try:
        cache = PrefixCache(url)
        if local is None and not cache.durable.fs.exists(cache.durable.root):
            raise UsageError(f"no cache at {url}: nothing is stored there")
    except CacheError as exc:
        raise UsageError(f"cannot open the cache at {url}: {exc}") from exc
    return cache


def _local_path(url: str) -> str | None:
    """The directory a bare path or ``file://`` URL names; ``None`` for other URLs."""
    if url.startswith("file://"):
        return url[len("file://") :]
    if "://" in url:
        return None
    return os.path.expanduser(url)
