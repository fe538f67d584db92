"""``eeipu-ray report`` and ``eeipu-ray cache``: reports of experiments, cache upkeep."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eeipu_ray.cli._common import UsageError, parse_size


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
    from eeipu_ray.cache import PrefixCache

    cache = PrefixCache(args.url)
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
        evicted = cache.evict(parse_size(args.max_bytes)) if args.max_bytes else []
        print(
            f"removed {len(removed)} leftovers of interrupted writes; "
            f"evicted {len(evicted)} entries"
        )
    return 0
