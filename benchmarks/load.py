"""Load: a long EEIPU sweep through Ray Tune, then an audit that nothing was lost.

``--trials`` trials (1000 by default) of the paper-compatible synthetic
pipeline run through ``tune.Tuner`` with ``--concurrency`` trials at once
(8), proposed by :class:`~eeipu_ray.tune.EEIPUSearcher` against a real local
prefix cache. Every ``--fail-every``-th distinct config (by its prefix key)
raises in its last stage, so that failures are part of the load. Afterwards
the script checks, and exits non-zero if any check fails:

1. every trial is accounted for: Tune has ``--trials`` trials, each
   TERMINATED or ERROR; the searcher (restored from the experiment directory,
   as ``Tuner.restore`` would) has one record per Tune trial, none pending,
   COMPLETED exactly where Tune says TERMINATED and FAILED where ERROR;
2. the budget spent equals the sum of the charged costs: the searcher's
   ``budget_spent`` equals the sum of ``total_cost`` over every trial's last
   reported result; a trial whose stage raised reports what it spent before
   it fails, and is charged that (none is charged nothing);
3. no leaked processes: once the sweep is over no trial process
   (``ray::ImplicitFunc``) of this run is alive, and after ``ray.shutdown``
   no process of this run is (they carry a marker in their environment);
4. no cache temp files: every entry directory has a manifest and holds only
   the data directory that manifest names, and the cache's garbage
   collector finds nothing to remove.

Figures (wall time, trials per second, failures, memoized trials) go to
``OUT.md`` / ``OUT.json``.

Examples::

    python benchmarks/load.py                              # 1000 trials, 8 at once
    python benchmarks/load.py --trials 100 --fast --out /tmp/load   # the test suite's
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_sweep import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
MARKER_ENV = "EEIPU_LOAD_RUN"


class InjectedFailure(RuntimeError):
    """The failure this benchmark injects into some trials."""


def _failing_last_stage(fn: Any, fail_every: int, previous: Any, params: Mapping[str, Any]) -> Any:
    # Deterministic in the config: a retried or repeated config fails again.
    digest = int(uuid.uuid5(uuid.NAMESPACE_OID, repr(sorted(params.items()))).hex[:8], 16)
    if fail_every > 0 and digest % fail_every == 0:
        raise InjectedFailure(f"injected failure for {dict(params)}")
    return fn(previous, params)


def build(fail_every: int) -> Any:
    """The paper-layout synthetic pipeline whose last stage fails for 1 in ``fail_every``."""
    from eeipu_ray.pipeline import Pipeline
    from eeipu_ray.pipelines.synthetic import build_pipeline

    base = build_pipeline()
    last = base.stages[-1]
    failing = replace(last, fn=functools.partial(_failing_last_stage, last.fn, fail_every))
    return Pipeline(base.name + "-load", [*base.stages[:-1], failing])


def _trial_id(trial: Any) -> str:
    return str(trial.trial_id)


def _processes_with(marker: str) -> list[tuple[int, str]]:
    """``(pid, cmdline)`` of live processes whose environment carries ``marker``."""
    found = []
    needle = f"{MARKER_ENV}={marker}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle not in fh.read():
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append((int(pid), cmdline))
    return found


def _wait_until_gone(marker: str, match: str, timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [(p, c) for p, c in _processes_with(marker) if match in c]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def audit_cache(root: Path, cache: Any) -> list[str]:
    """Problems with the local cache's files (empty: none)."""
    problems = []
    entries = root / "entries"
    for entry in sorted(entries.iterdir()) if entries.exists() else []:
        manifest = entry / "manifest.json"
        if not manifest.exists():
            problems.append(f"{entry.name[:12]}: no manifest")
            continue
        named = json.loads(manifest.read_text()).get("data_dir")
        for child in entry.iterdir():
            if child.name in ("manifest.json", "used"):
                continue
            if child.name != named:
                problems.append(f"{entry.name[:12]}: stray {child.name}")
    removed = cache.gc(older_than=0.0)
    if removed:
        problems.append(f"gc removed {len(removed)} leftovers: {removed[:3]}")
    return problems


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The sweep and the audit; returns the figures and the failed checks."""
    import ray
    from ray import tune

    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.search import EngineOptions
    from eeipu_ray.search.records import TrialStatus
    from eeipu_ray.tune import EEIPUSearcher

    marker = uuid.uuid4().hex
    pipeline = build(args.fail_every)
    cache_root = workdir / "cache"
    cache = PrefixCache(cache_root)
    options = (
        EngineOptions(num_restarts=2, raw_samples=64, mc_samples=64, maxiter=20)
        if args.fast
        else EngineOptions()
    )
    common: dict[str, Any] = {
        "metric": "score",
        "mode": "max",
        "budget": args.budget,
        "cache": cache,
        "max_concurrent": args.concurrency,
        "options": replace(options, n_warmup=10, seed=args.seed),
    }
    searcher = EEIPUSearcher(pipeline, **common)
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(args.concurrency)
    ray.init(
        address="local",
        num_cpus=args.concurrency,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {MARKER_ENV: marker}},
    )
    failed: list[str] = []
    try:
        started = time.perf_counter()
        grid = tune.Tuner(
            tune.with_resources(pipeline.as_trainable(cache=cache, metric="score"), {"cpu": 1}),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=args.trials,
                reuse_actors=True,
                trial_dirname_creator=_trial_id,  # a trial's directory is named by its id
            ),
            run_config=tune.RunConfig(
                storage_path=str(workdir / "tune"),
                name="load",
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        ).fit()
        wall = time.perf_counter() - started
        leaked_trials = _wait_until_gone(marker, "ray::ImplicitFunc", timeout=30.0)
    finally:
        ray.shutdown()
    leaked_after_shutdown = _wait_until_gone(marker, "", timeout=30.0)

    # 1. Every trial accounted for.
    tune_status = {}
    results = {}
    spent_reported = []  # every trial's last reported total_cost (an errored one's too)
    for result in grid:
        trial_id = Path(result.path).name
        tune_status[trial_id] = "ERROR" if result.error else "TERMINATED"
        if not result.error:
            results[trial_id] = dict(result.metrics)
        if "total_cost" in (result.metrics or {}):
            spent_reported.append(float(result.metrics["total_cost"]))
    if len(grid) != args.trials:
        failed.append(f"Tune ran {len(grid)} trials, not {args.trials}")
    restored = EEIPUSearcher(pipeline, **common)
    restored.restore_from_dir(str(workdir / "tune" / "load"))
    records = {r.trial_id: r for r in restored.engine.records}
    if len(records) != len(grid):
        failed.append(f"the searcher has {len(records)} records for {len(grid)} trials")
    pending = [t for t, r in records.items() if r.status is TrialStatus.PENDING]
    if pending:
        failed.append(f"{len(pending)} records still pending: {pending[:3]}")
    mismatched = [
        t for t, r in records.items() if (r.status is TrialStatus.COMPLETED) != (t in results)
    ]
    if mismatched:
        failed.append(f"{len(mismatched)} records disagree with Tune: {mismatched[:3]}")
    errors = [t for t, s in tune_status.items() if s == "ERROR"]
    # 2. Budget spent == sum of what was charged == sum of the final results' costs.
    charged = math.fsum(r.charged_cost for r in records.values())
    reported = math.fsum(spent_reported)
    unpaid = [t for t in errors if records.get(t) is None or records[t].charged_cost <= 0]
    if unpaid:
        failed.append(f"{len(unpaid)} errored trials charged nothing: {unpaid[:3]}")
    if not (restored.budget_spent == charged and math.isclose(charged, reported, rel_tol=1e-12)):
        failed.append(
            f"budget spent {restored.budget_spent!r}, charged {charged!r}, reported {reported!r}"
        )
    # 3. Processes.
    if leaked_trials:
        failed.append(f"trial processes alive after the sweep: {leaked_trials[:3]}")
    if leaked_after_shutdown:
        failed.append(f"processes alive after ray.shutdown: {leaked_after_shutdown[:3]}")
    # 4. Cache files.
    failed += [f"cache: {p}" for p in audit_cache(cache_root, cache)]
    return {
        "trials": len(grid),
        "concurrency": args.concurrency,
        "completed": len(results),
        "errored": len(errors),
        "memoized": sum(int(r.get("memoized_stages", 0)) > 0 for r in results.values()),
        "budget_spent": restored.budget_spent,
        "wall_s": wall,
        "trials_per_s": len(grid) / wall,
        "cache_entries": len(cache.entries()),
        "checks_failed": failed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--fail-every", type=int, default=20, help="1 in N configs fails; 0: none")
    ap.add_argument("--budget", type=float, default=1e9, help="cost units (large: not binding)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true", help="a small acquisition optimizer")
    ap.add_argument("--out", type=Path, default=RESULTS / "load")
    args = ap.parse_args(argv)
    command = "python benchmarks/load.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="eeipu-load-"))
    try:
        figures = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [
        "| trials | at once | completed | errored (injected) | memoized | budget spent "
        "| wall s | trials/s | cache entries | checks |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {figures['trials']} | {figures['concurrency']} | {figures['completed']} "
        f"| {figures['errored']} | {figures['memoized']} | {figures['budget_spent']:.6g} "
        f"| {figures['wall_s']:.1f} | {figures['trials_per_s']:.2f} "
        f"| {figures['cache_entries']} "
        f"| {'all passed' if not figures['checks_failed'] else 'FAILED'} |",
    ]
    print("\n".join(lines))
    for problem in figures["checks_failed"]:
        print(f"CHECK FAILED: {problem}")
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": command,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "figures": figures,
    }
    out.with_name(out.name + ".json").write_text(json.dumps(doc, indent=2))
    md = [
        "# Load: a long sweep through Ray Tune, audited",
        "",
        f"Command: `{command}` ({doc['when']})",
        "",
        f"Machine: {machine['cpu_count']} CPUs, {machine['platform']}; "
        f"load average at start {machine['loadavg_at_start']}",
        "",
        "Checks (see the module docstring): every trial accounted for; budget spent = sum "
        "of charged costs = sum of the final results' costs; no trial process alive after "
        "the sweep and no process of the run after ray.shutdown; no cache temp files.",
        "",
        *lines,
        "",
        *[f"- CHECK FAILED: {p}" for p in figures["checks_failed"]],
    ]
    out.with_name(out.name + ".md").write_text("\n".join(md))
    return 1 if figures["checks_failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
