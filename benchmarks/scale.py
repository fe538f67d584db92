"""The searcher driving many simulated GPU workers: does ``suggest`` keep up?

A scale simulation of EEIPU on a cluster, on one machine. ``W`` simulated GPU
workers (threads) run trials of the paper-compatible synthetic pipeline
through the real memoized runner against a real local prefix cache; every
stage sleeps ``time_scale`` seconds per declared cost unit (a GPU stage of
minutes, scaled down to seconds). The driver loop makes the calls Ray Tune's
controller makes, in the order it makes them: ``on_trial_complete`` for every
finished trial, then ``suggest`` for every free worker, until the searcher
returns ``Searcher.FINISHED`` and the trials in flight drain. ``suggest`` runs
on the driver thread, as in Tune, so while it computes, free workers wait.

Per worker count it prints and records:

* ``suggest/s``: suggestions handed out per second of driver time spent in
  ``suggest`` (the searcher's throughput), and the p50 / p95 / max latency
  of one ``suggest`` call;
* ``busy``: the fraction of worker time spent running trials, from the first
  suggestion until the budget first left a free worker without a trial
  (``busy_all``: until the last trial drained, which also counts that tail,
  where the running trials are expected to spend the rest of the budget and
  workers have nothing left to do);
* ``wait``: the fraction of worker time spent idle while the driver was
  inside ``suggest`` (the searcher as the bottleneck);
* BO quality at the same total budget: best objective, trials, memoized
  trials, next to the 1-worker run (sequential, ``max_concurrent=1``: exact
  BO; its quality does not depend on time, so it runs with no sleep).

The budget is charged as the engine charges it: a new trial starts while the
cost charged plus the expected cost of the running trials is below the
budget (``EngineOptions.reserve_pending``), so ``spent`` ends near the budget
rather than one round of ``W`` trials past it.

Examples::

    python benchmarks/scale.py                          # 1, 8, 32, 64 workers, 1 seed
    python benchmarks/scale.py --workers 64 --time-scale 1 --seeds 1
    python benchmarks/scale.py --smoke --out /tmp/scale  # what the test suite runs
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_sweep import f, machine_info, mean_se

RESULTS = Path(__file__).resolve().parent / "results"


def _run_trial(pipeline: Any, cache: Any, trial_id: str, config: dict[str, Any]) -> Any:
    start = time.perf_counter()
    run = pipeline.run(config, cache, trial_id=trial_id)
    return run.to_result("score"), start, time.perf_counter()


def simulate(
    workers: int,
    seed: int,
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    """One simulated sweep with ``workers`` workers; returns its row of figures."""
    from ray.tune.search import Searcher

    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipelines.synthetic import build_pipeline
    from eeipu_ray.search import EngineOptions
    from eeipu_ray.search.records import TrialStatus
    from eeipu_ray.tune.searcher import EEIPUSearcher

    time_scale = args.time_scale if workers > 1 else 0.0
    pipeline = build_pipeline(time_scale=time_scale, layout=args.layout)
    rundir = workdir / f"s{seed}-w{workers}"
    cache = PrefixCache(rundir / "cache")
    options = (
        EngineOptions(num_restarts=2, raw_samples=64, mc_samples=64, maxiter=20)
        if args.smoke
        else EngineOptions()
    )
    searcher = EEIPUSearcher(
        pipeline,
        metric="score",
        mode="max",
        budget=args.budget,
        cache=cache,
        max_concurrent=workers,
        options=replace(options, n_warmup=args.warmup, seed=seed),
    )
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sim-gpu")
    running: dict[concurrent.futures.Future[Any], str] = {}
    n_free = workers
    intervals: list[tuple[float, float]] = []  # (start, end) of every trial
    latencies: list[float] = []
    idle_in_suggest = 0.0  # worker-seconds idle while the driver was in suggest
    n_trials = 0
    finished = False
    closed_at: float | None = None  # first time the budget kept a free worker idle
    start = time.perf_counter()
    try:
        while True:
            while n_free and not finished:
                trial_id = f"t{n_trials:05d}"
                t0 = time.perf_counter()
                config = searcher.suggest(trial_id)
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                if closed_at is None:
                    # Every free worker, the one this call fills included, waited.
                    idle_in_suggest += n_free * (t1 - t0)
                if config is None or config == Searcher.FINISHED:
                    # A free worker and no trial: the running trials are expected
                    # to spend the rest of the budget (None), or it is spent.
                    closed_at = closed_at or t1
                    finished = config == Searcher.FINISHED
                    break
                n_free -= 1
                running[pool.submit(_run_trial, pipeline, cache, trial_id, config)] = trial_id
                n_trials += 1
            if not running:
                break
            done, _ = concurrent.futures.wait(
                list(running), return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                trial_id = running.pop(future)
                result, began, ended = future.result()
                intervals.append((began, ended))
                searcher.on_trial_complete(trial_id, result=result)
                n_free += 1
        end = time.perf_counter()
    finally:
        pool.shutdown(wait=True)

    records = searcher.engine.records
    done_records = [r for r in records if r.status is TrialStatus.COMPLETED]
    stop = closed_at or end
    window = stop - start
    busy_all = math.fsum(e - b for b, e in intervals)
    # Inside the window, a trial still running at FINISHED counts up to then.
    busy = math.fsum(max(0.0, min(e, stop) - b) for b, e in intervals)
    row = {
        "workers": workers,
        "seed": seed,
        "time_scale": time_scale,
        "trials": len(records),
        "completed": len(done_records),
        "failed": sum(r.status is TrialStatus.FAILED for r in records),
        "memo": sum(r.memoized_stages > 0 for r in records),
        "best": max((float(r.objective) for r in done_records), default=math.nan),
        "budget": args.budget,
        "budget_spent": searcher.budget_spent,
        "wall_s": end - start,
        "window_s": window,
        "drain_s": end - stop,
        "busy_all": busy_all / (workers * (end - start)) if end > start else math.nan,
        "busy": busy / (workers * window) if window > 0 else math.nan,
        "wait": idle_in_suggest / (workers * window) if window > 0 else math.nan,
        "closed_s": stop - start,
        "suggest_s": math.fsum(latencies),
        "suggest_per_s": len(latencies) / math.fsum(latencies) if latencies else math.nan,
        "suggest_p50_s": _quantile(latencies, 0.5),
        "suggest_p95_s": _quantile(latencies, 0.95),
        "suggest_max_s": max(latencies, default=math.nan),
    }
    if time_scale == 0:  # no simulated durations: worker time means nothing
        row.update(busy=math.nan, busy_all=math.nan, wait=math.nan)
    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return row


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tables(rows: list[dict[str, Any]]) -> list[str]:
    """The per-run table and the summary against the 1-worker run."""
    lines = [
        "| workers | seed | s per unit | trials | memo | best | spent | wall s | busy | busy_all "
        "| wait | suggest/s | p50 s | p95 s | max s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['seed']} | {f(r['time_scale'], 3)} | {r['trials']} "
            f"| {r['memo']} | {f(r['best'])} | {f(r['budget_spent'], 1)} | {f(r['wall_s'], 1)} "
            f"| {f(r['busy'], 3)} | {f(r['busy_all'], 3)} | {f(r['wait'], 3)} "
            f"| {f(r['suggest_per_s'], 1)} | {f(r['suggest_p50_s'], 3)} "
            f"| {f(r['suggest_p95_s'], 3)} | {f(r['suggest_max_s'], 3)} |"
        )
    lines += [
        "",
        "| workers | seeds | best (mean ± s.e.) | best - 1-worker best | trials | busy | wait |",
        "|---|---|---|---|---|---|---|",
    ]
    by_workers: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_workers.setdefault(r["workers"], []).append(r)
    base = {r["seed"]: r["best"] for r in by_workers.get(1, [])}
    for w, group in sorted(by_workers.items()):
        best, se = mean_se([r["best"] for r in group])
        diffs = [r["best"] - base[r["seed"]] for r in group if r["seed"] in base]
        diff = statistics.fmean(diffs) if diffs else math.nan
        busy = statistics.fmean(r["busy"] for r in group)
        wait = statistics.fmean(r["wait"] for r in group)
        trials = statistics.fmean(r["trials"] for r in group)
        lines.append(
            f"| {w} | {len(group)} | {f(best)} ± {f(se)} | {f(diff)} | {f(trials, 1)} "
            f"| {f(busy, 3)} | {f(wait, 3)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,8,32,64", help="comma-separated worker counts")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--budget", type=float, default=1000.0, help="cost units, warm-up included")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--layout", default="paper")
    ap.add_argument(
        "--time-scale", type=float, default=2.0, help="seconds of sleep per cost unit (W > 1)"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny run (the test suite's)")
    ap.add_argument("--keep", action="store_true", help="keep the caches")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale")
    ap.add_argument(
        "--render", type=Path, default=None, help="rebuild OUT.md from this JSON; run nothing"
    )
    args = ap.parse_args(argv)
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        for row in doc["rows"]:
            if row["time_scale"] == 0:  # no simulated durations: worker time means nothing
                row.update(busy=math.nan, busy_all=math.nan, wait=math.nan)
        _write(args.out, doc)
        print("\n".join(tables(doc["rows"])))
        return 0
    worker_counts = [int(w) for w in args.workers.split(",")]
    if args.smoke:
        args.budget = min(args.budget, 60.0)
        args.warmup = min(args.warmup, 4)
    command = "python benchmarks/scale.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="eeipu-scale-"))
    try:
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            for w in worker_counts:
                row = simulate(w, seed, args, workdir)
                rows.append(row)
                print(
                    f"seed {seed} workers {w}: {row['trials']} trials, best {row['best']:.3f}, "
                    f"busy {f(row['busy'], 3)}, wait {f(row['wait'], 3)}, "
                    f"{row['suggest_per_s']:.1f} suggest/s, wall {row['wall_s']:.1f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(tables(rows)))
    doc = {
        "command": command,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "budget": args.budget,
            "warmup": args.warmup,
            "layout": args.layout,
            "time_scale": args.time_scale,
            "smoke": args.smoke,
        },
        "rows": rows,
    }
    _write(args.out, doc)
    return 0


def _write(out: Path, doc: dict[str, Any]) -> None:
    """``OUT.json`` (every row) and ``OUT.md`` (the tables)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    machine, settings = doc["machine"], doc["settings"]
    md = [
        "# Scale simulation: the searcher driving simulated GPU workers",
        "",
        f"Command: `{doc['command']}` ({doc['when']})",
        "",
        f"Machine: {machine['cpu_count']} CPUs, {machine['platform']}; "
        f"load average at start {machine['loadavg_at_start']}",
        "",
        f"Settings: {settings['layout']} layout, budget {settings['budget']:g} cost units "
        f"(warm-up of {settings['warmup']} included), stages sleep "
        f"{settings['time_scale']:g} s per cost unit with W > 1 (the 1-worker run sleeps 0: "
        "sequential BO does not depend on time).",
        "",
        "busy: worker time running trials until the budget first left a worker idle; "
        "busy_all: until the last trial drained; wait: worker time idle while the driver "
        "was in suggest; suggest/s: suggestions per second of driver time in suggest.",
        "",
        *tables(doc["rows"]),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    raise SystemExit(main())
