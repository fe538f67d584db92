"""Tell methods apart: regret, cost-to-target and paired per-seed t statistics.

Runs the synthetic layouts in-process, without Ray Tune, so that many seeds
fit on a small machine: each method's searcher (the same objects
``compare.py`` hands to ``tune.Tuner``: :class:`~eeipu_ray.tune.EEIPUSearcher`,
MS_BO, LaMBO, Ray's ``OptunaSearch``) is driven through the Tune ``Searcher``
API one trial at a time, and every trial runs the layout's real pipeline
through the memoized runner against a fresh local
:class:`~eeipu_ray.cache.PrefixCache`: a trial that shares a prefix with an
earlier one loads it (0.1 units per stage) exactly as under Tune. Stage costs
are declared, so a run's figures do not depend on the machine.
``compare.py`` runs the same searchers through ``tune.Tuner``; on the same
seeds the two give the same figures up to the optimizer's floating-point
nondeterminism.

Figures per layout and method (``OUT.md``):

* ``regret``: the layout's true optimum (``results/synthetic_optima.json``,
  :mod:`optima`) minus the best objective found within the budget;
* ``candidates``: trials completed after the warm-up (the paper's BO
  iterations) and the % relative to EI;
* cost-to-target: the cost spent when a run first reached EI's median final
  best (and TPE's), median over seeds, as a fraction of the budget; a run
  that never reached it counts as infinite (so the median is infinite when
  at most half the seeds reached it);
* paired differences: per seed, the focus method's best minus each peer's,
  their mean and ``t = mean / (sd / sqrt(n))``. ``|t| < 2`` is within the
  noise of this many seeds.

Seeds 0-9 are for choosing designs, 10-19 for reporting: the tables are
written per seed set, and a decision must cite only the design seeds.
Results accumulate in ``OUT.json`` (``--append``; rows are keyed by layout,
method label and seed, so a run is never repeated), across runs of the script.

Examples::

    python benchmarks/evaluate.py --layouts paper,front4 --methods eeipu,ei,optuna_tpe \\
        --seeds 0-9 --append
    python benchmarks/evaluate.py --methods eeipu --label eeipu-q10 --option top_q=10 \\
        --seeds 0-9 --append
    python benchmarks/evaluate.py --report          # rewrite OUT.md from OUT.json
    python benchmarks/evaluate.py --report --from-compare benchmarks/results/compare_real.json \\
        --out benchmarks/results/evaluate_real      # the same tables for compare.py's Tune runs
    python benchmarks/evaluate.py --smoke --out /tmp/eval
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (
    ENGINE_METHODS,
    METHODS,
    PIPELINES,
    engine_options,
    make_searcher,
    read_results,
    summarize,
)
from optima import OPTIMA_FILE, load_optima
from synthetic_sweep import f, machine_info, mean_se

from eeipu_ray import result as R
from eeipu_ray.cli import UsageError, parse_key_values

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = ("paper", "front4", "back5", "flat4", "costly3")
SEED_SETS = {
    "design (seeds 0-9)": range(0, 10),
    "held-out (seeds 10-19)": range(10, 20),
    "held-out (seeds 20-29)": range(20, 30),
    "held-out, pooled (seeds 10-29)": range(10, 30),
}
NOISE_T = 2.0  # |t| below this: within the noise


# --------------------------------------------------------------------------
# The results file
# --------------------------------------------------------------------------


def _save_row(path: Path, doc: dict[str, Any], row: dict[str, Any], command: str) -> dict[str, Any]:
    """Add ``row`` to ``path`` and return the file's whole document.

    Several runs may append to one file at once (say a baseline and an
    ablation on the other core): under an exclusive lock the file is read
    again and the row merged into what is on disk, so no run's rows are lost.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = json.loads(path.read_text()) if path.exists() else {"commands": [], "rows": []}
        if command not in disk["commands"]:
            disk["commands"].append(command)
        key = (row["pipeline"], row["method"], row["seed"])
        if all((r["pipeline"], r["method"], r["seed"]) != key for r in disk["rows"]):
            disk["rows"].append(copy.deepcopy(row))
        disk["machine"], disk["date"] = doc["machine"], doc["date"]
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(disk, indent=1) + "\n")
        os.replace(tmp, path)
    return disk


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def paired_t(differences: list[float]) -> tuple[float, float, int]:
    """``(mean, t, n)`` of per-seed differences; ``t`` is ``nan`` for ``n < 2`` and
    ``+-inf`` when every difference is the same non-zero number."""
    n = len(differences)
    if n == 0:
        return math.nan, math.nan, 0
    mean = statistics.fmean(differences)
    if n < 2:
        return mean, math.nan, n
    sd = statistics.stdev(differences)
    if sd == 0.0:
        return mean, (0.0 if mean == 0.0 else math.copysign(math.inf, mean)), n
    return mean, mean / (sd / math.sqrt(n)), n


def cost_to_target(curve: list[list[float]] | list[tuple[float, float]], target: float) -> float:
    """The cost spent when the best-so-far first reached ``target`` (``inf`` if never)."""
    for spent, best in curve:
        if math.isfinite(best) and best >= target:
            return float(spent)
    return math.inf


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


def run_one(
    method: str, label: str, layout: str, seed: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """One run of ``method`` on ``layout`` (``args.workers`` trials at a time); its row."""

    from eeipu_ray.cache import PrefixCache

    spec = PIPELINES[layout]
    pipeline = spec.build()
    rundir = workdir / f"{layout}-{label}-s{seed}"
    cache = PrefixCache(rundir / "cache")
    searcher, param_space = make_searcher(method, pipeline, spec, seed, args, cache)
    if param_space is not None:
        searcher.set_search_properties("score", "max", param_space)
    start = time.perf_counter()
    log = _simulate_workers(searcher, pipeline, cache, args.workers, rundir)
    wall = time.perf_counter() - start
    row = summarize(log, method, spec, seed, args)
    row["method"] = label
    row["base_method"] = method
    row["options"] = dict(args.engine_options)
    if getattr(args, "against", None):
        row["against"] = args.against
    row["wall_s"] = wall
    row["workers"] = args.workers
    shutil.rmtree(rundir, ignore_errors=True)
    return row


class _DeferredCache:
    """One simulated trial's view of the shared prefix cache: it loads what the
    shared cache holds when the trial starts, and what it stores becomes
    visible to other trials only when it finishes (:meth:`publish`)."""

    def __init__(self, shared: Any, scratch: Path) -> None:
        from eeipu_ray.cache import PrefixCache

        self.shared = shared
        self.scratch = scratch
        self.own = PrefixCache(scratch)
        self.keys: list[str] = []
        self.loaded_from: list[str | None] = []  # producing trial of each hit

    def contains(self, key: str) -> bool:
        return self.shared.contains(key)

    def load(self, key: str, *, workdir: Any = None) -> Any:
        hit = self.shared.load(key, workdir=workdir)
        if hit is not None:
            self.loaded_from.append(hit.manifest.meta.trial_id)
        return hit

    def store(self, key: str, value: Any, meta: Any) -> Any:
        self.keys.append(key)
        return self.own.store(key, value, meta)

    def publish(self) -> None:
        for key in self.keys:
            hit = self.own.load(key)
            if hit is not None and not self.shared.contains(key):
                self.shared.store(key, hit.value, hit.manifest.meta)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _simulate_workers(searcher: Any, pipeline: Any, cache: Any, workers: int,
                      rundir: Path) -> list[dict[str, Any]]:
    """``workers`` trials at a time in simulated time: each trial lasts what it is
    charged (its stages' declared costs, loads included), the searcher hears of
    completions in the order they finish and is asked for a trial whenever a
    worker is free (as Tune's controller asks). A trial's stage outputs reach
    the shared cache when it finishes (with one worker nothing overlaps, and the
    trials use the shared cache directly). Returns the log in completion order."""
    import heapq

    from ray.tune.search import Searcher

    log: list[dict[str, Any]] = []
    running: list[tuple[float, int, str, dict[str, Any], _DeferredCache | None]] = []
    now, i, finished = 0.0, 0, False
    while True:
        while not finished and len(running) < workers:
            trial_id = f"t{i:05d}"
            config = searcher.suggest(trial_id)
            if config == Searcher.FINISHED:
                finished = True
                break
            if config is None:
                break  # nothing now: wait for a completion
            view = _DeferredCache(cache, rundir / "scratch" / trial_id) if workers > 1 else None
            target = cache if view is None else view
            result = pipeline.run(config, target, trial_id=trial_id).to_result("score")
            duration = float(result.get(R.TOTAL_COST) or 0.0)
            heapq.heappush(running, (now + duration, i, trial_id, result, view))
            i += 1
        if not running:
            break
        now, _, trial_id, result, view = heapq.heappop(running)
        if view is not None:
            view.publish()
        searcher.on_trial_complete(trial_id, result)
        log.append({"error": False, **result, "trial_id": trial_id, "finished_at": now,
                    "loaded_from": list(view.loaded_from) if view is not None else []})
    return log


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def _rows_of(rows: list[dict[str, Any]], layout: str, seeds: range) -> list[dict[str, Any]]:
    return [r for r in rows if r["pipeline"] == layout and r["seed"] in seeds]


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted({r["method"] for r in rows}, key=lambda m: (order.get(m, len(order)), m))


def _common_seeds(rows: list[dict[str, Any]], methods: list[str]) -> set[int]:
    seeds = [{r["seed"] for r in rows if r["method"] == m} for m in methods]
    return set.intersection(*seeds) if seeds else set()


def layout_table(rows: list[dict[str, Any]], layout: str, optimum: float | None,
                 focus: list[str]) -> list[str]:
    """Per method: regret, candidates, cost-to-target; then the paired comparisons."""
    methods = _methods(rows)
    common = _common_seeds(rows, methods)
    rows = [r for r in rows if r["seed"] in common]
    if not rows:
        return ["(no seed run by every method)"]
    budget = max(r["budget"] for r in rows)
    targets: dict[str, float] = {}
    for peer in ("ei", "optuna_tpe"):
        finals = [r["best"] for r in rows if r["method"] == peer]
        if finals:
            targets[peer] = median(finals)
    ei_cand = mean_se([float(r["candidates"]) for r in rows if r["method"] == "ei"])[0]
    header = "| method | seeds | best |" + (" regret |" if optimum is not None else "") + \
        " candidates | vs EI |"
    rule = "|---|---|---|" + ("---|" if optimum is not None else "") + "---|---|"
    for peer in targets:
        header += f" cost to {peer}'s median best (reached) |"
        rule += "---|"
    lines = [header, rule]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        best = mean_se([r["best"] for r in mine])
        regret = (
            mean_se([optimum - r["best"] for r in mine]) if optimum is not None
            else (math.nan, math.nan)
        )
        cand = mean_se([float(r["candidates"]) for r in mine])
        pct = 100.0 * (cand[0] / ei_cand - 1.0) if ei_cand and ei_cand > 0 else math.nan
        cells = [m, str(len(mine)), f"{f(best[0], 3)} ± {f(best[1], 3)}",
                 *([f"{f(regret[0], 3)} ± {f(regret[1], 3)}"] if optimum is not None else []),
                 f"{f(cand[0], 1)} ± {f(cand[1], 1)}",
                 "-" if not math.isfinite(pct) else f"{pct:+.0f}%"]
        for target in targets.values():
            costs = [cost_to_target(r["curve"], target) for r in mine]
            reached = sum(math.isfinite(c) for c in costs)
            med = median(costs)
            cells.append(
                f"{'never' if not math.isfinite(med) else f'{med / budget:.2f} B'} "
                f"({reached}/{len(costs)})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    for m in focus:
        if m not in methods:
            continue
        lines += ["", f"Paired per seed, {m}'s best minus each peer's (positive: {m} better; "
                  f"|t| < {NOISE_T:g}: within the noise):", "",
                  "| peer | mean difference | t | seeds | verdict |", "|---|---|---|---|---|"]
        mine = {r["seed"]: r["best"] for r in rows if r["method"] == m}
        for peer in methods:
            if peer == m:
                continue
            diffs = [mine[r["seed"]] - r["best"] for r in rows
                     if r["method"] == peer and r["seed"] in mine]
            mean, t, n = paired_t(diffs)
            verdict = (
                "-" if not math.isfinite(t) and math.isnan(t)
                else "better" if t >= NOISE_T else "worse" if t <= -NOISE_T else "within noise"
            )
            lines.append(f"| {peer} | {f(mean, 3)} | {f(t, 2)} | {n} | {verdict} |")
    return lines


def _split_variants(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the main table, and the variant labels reported beside it.

    The main table holds the unlabelled methods that ran every seed the most
    complete method ran; labelled runs (ablations, ``--label``) and methods
    run on fewer seeds are variants, each compared on its own seeds.
    """
    plain = [r for r in rows if r["method"] == r.get("base_method", r["method"])]
    seeds = {m: {r["seed"] for r in plain if r["method"] == m} for m in _methods(plain)}
    widest = max((len(s) for s in seeds.values()), default=0)
    core = [m for m, s in seeds.items() if len(s) == widest]
    variants = [m for m in _methods(rows) if m not in core]
    return [r for r in rows if r["method"] in core], variants


def variants_table(rows: list[dict[str, Any]], variants: list[str],
                   optimum: float | None) -> list[str]:
    """Each variant against its base method (``eeipu`` for a new acquisition, or the
    label its rows name as ``against``: the method with the defaults of the time)
    and EI, paired on the seeds the variant ran."""
    lines = ["| variant | options | seeds | best | regret | candidates | vs base: mean, t "
             "| vs ei: mean, t |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["method"], r["seed"]): r for r in rows}
    for v in variants:
        mine = sorted((r for r in rows if r["method"] == v), key=lambda r: r["seed"])
        base = mine[0].get("against") or mine[0].get("base_method", v)
        if base == v:
            base = "eeipu"
        best = mean_se([r["best"] for r in mine])
        regret = (mean_se([optimum - r["best"] for r in mine]) if optimum is not None
                  else (math.nan, math.nan))
        cand = mean_se([float(r["candidates"]) for r in mine])
        cells = [v, json.dumps(mine[0].get("options") or {}), str(len(mine)),
                 f"{f(best[0], 3)} ± {f(best[1], 3)}", f"{f(regret[0], 3)} ± {f(regret[1], 3)}",
                 f"{f(cand[0], 1)} ± {f(cand[1], 1)}"]
        for peer in (base, "ei"):
            diffs = [r["best"] - by[(peer, r["seed"])]["best"] for r in mine
                     if (peer, r["seed"]) in by]
            mean, t, n = paired_t(diffs)
            cells.append(f"{peer}: {f(mean, 3)}, t {f(t, 2)} ({n})" if n else f"{peer}: -")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


IN_PROCESS = (
    "In-process runs (no Tune): each method's searcher driven through the Searcher "
    "API, each trial through the real memoized runner and a fresh local prefix cache; "
    "declared costs."
)
TUNED = (
    "Ray Tune runs (`benchmarks/compare.py`: `tune.Tuner`, one trial at a time, a fresh "
    "local prefix cache per run); a stage's cost is its measured wall-clock time, so "
    "the figures carry the machine's timing noise."
)


def report(rows: list[dict[str, Any]], commands: list[str], machine: dict[str, Any],
           optima: dict[str, float], focus: list[str], out: Path,
           how: str = IN_PROCESS) -> None:
    md = [
        "# Methods told apart: regret, cost-to-target, paired t",
        "",
        "Commands (in order; every run appends to the same file):",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"Machine: {machine.get('cpu_count')} CPUs, {machine.get('platform')}; "
        + ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items()),
        "",
        how + " Regret (synthetic layouts; a real pipeline has no known optimum) against "
        "the optimum in "
        f"`{OPTIMA_FILE.relative_to(OPTIMA_FILE.parents[1])}`. "
        "The main tables use only the seeds every method in them ran; labelled runs "
        "(ablations) and methods run on fewer seeds are listed as variants below them.",
        "",
    ]
    shown: dict[str, list[set[int]]] = {}  # per layout, the seed sets already reported
    for title, seeds in SEED_SETS.items():
        # A pooled set holding the rows of one set already reported adds nothing.
        present = [
            lay
            for lay in PIPELINES
            if _rows_of(rows, lay, seeds)
            and {r["seed"] for r in _rows_of(rows, lay, seeds)} not in shown.get(lay, [])
        ]
        for lay in present:
            shown.setdefault(lay, []).append({r["seed"] for r in _rows_of(rows, lay, seeds)})
        if not present:
            continue
        md += [f"## {title}", ""]
        for layout in present:
            spec = PIPELINES[layout]
            budgets = sorted({r["budget"] for r in _rows_of(rows, layout, seeds)})
            main, variants = _split_variants(_rows_of(rows, layout, seeds))
            md += [f"### {layout}: {spec.description}", "",
                   f"Budget {', '.join(f'{b:g}' for b in budgets)} {spec.unit} (B)"
                   + (f"; optimum {f(optima[layout], 4)}" if layout in optima else "")
                   + ". Mean ± standard error over seeds.", "",
                   *layout_table(main, layout, optima.get(layout), focus), ""]
            if variants:
                md += ["Variants, each paired per seed with its base method (the rows its "
                       "`against` names where it has one: the method under the defaults "
                       "of the time the variant ran) and with EI on "
                       "the seeds it ran (mean difference of the best, variant minus peer; "
                       f"|t| < {NOISE_T:g}: within the noise):", "",
                       *variants_table(_rows_of(rows, layout, seeds), variants,
                                       optima.get(layout)), ""]
    out.with_suffix(".md").write_text("\n".join(md))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    return seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list from {LAYOUTS}")
    ap.add_argument("--methods", default="eeipu,ei,eips,carbo,optuna_tpe",
                    help=f"comma list from {METHODS}")
    ap.add_argument("--label", default=None,
                    help="name the rows of a single method by this label (ablations)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="EngineOptions override for the engine methods (JSON value)")
    ap.add_argument("--against", default=None, metavar="LABEL",
                    help="with --label: the rows the variant is paired with (default: its "
                         "method), e.g. the method's run under the current defaults")
    ap.add_argument("--seeds", default="0-9", help="e.g. 0-9 (design), 10-19 or 20-29 (held out)")
    ap.add_argument("--workers", type=int, default=1,
                    help="trials at a time, in simulated time (engine methods only)")
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--fast", action="store_true", help="small acquisition optimizers")
    ap.add_argument("--smoke", action="store_true",
                    help="paper layout, eeipu and ei, seed 0, budget 30, 3 warm-up, --fast")
    ap.add_argument("--focus", default="eeipu", help="methods compared pairwise with every peer")
    ap.add_argument("--append", action="store_true", help="add to the rows in OUT.json")
    ap.add_argument("--report", action="store_true", help="run nothing; rewrite OUT.md")
    ap.add_argument("--from-compare", default=None, nargs="+", metavar="JSON",
                    help="with --report: the rows of compare.py (Tune) runs, e.g. "
                         "results/compare_real.json, instead of OUT.json; several files "
                         "are merged (methods run on fewer seeds become variants)")
    ap.add_argument("--out", default=str(RESULTS / "evaluate_synthetic"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.fast, args.budget, args.warmup = True, args.budget or 30.0, args.warmup or 3
        args.layouts, args.methods, args.seeds = "paper", "eeipu,ei", "0"
    try:
        args.engine_options = parse_key_values(args.option)
    except UsageError as exc:
        raise SystemExit(str(exc)) from None
    args.keep = False
    if args.from_compare and not args.report:
        ap.error("--from-compare needs --report")
    out = Path(args.out)
    path = out.with_suffix(".json")
    if args.from_compare:
        missing = [p for p in args.from_compare if not Path(p).is_file()]
        if missing:
            ap.error(f"--from-compare: no such file {missing[0]}")
        try:
            doc = read_results([Path(p) for p in args.from_compare])
        except ValueError as exc:
            ap.error(f"--from-compare: {exc}")
    else:
        doc = (json.loads(path.read_text()) if (args.append or args.report) and path.exists()
               else {"commands": [], "rows": []})
    optima = load_optima()
    focus = args.focus.split(",")
    if args.report:
        report(doc["rows"], doc["commands"], doc.get("machine", {}), optima, focus, out,
               how=TUNED if args.from_compare else IN_PROCESS)
        print(f"wrote {out.with_suffix('.md')}")
        return 0
    layouts = args.layouts.split(",")
    methods = args.methods.split(",")
    bad = [lay for lay in layouts if lay not in LAYOUTS] + [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown layouts or methods: {bad}")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    if args.workers > 1:
        serial = [m for m in methods if m not in ENGINE_METHODS]
        if serial:
            ap.error(f"--workers > 1 needs engine methods; {serial} run one trial at a time")
    if args.label and len(methods) != 1:
        ap.error("--label names the rows of one method; give one --methods entry")
    if args.against and not args.label:
        ap.error("--against pairs a labelled variant; give --label too")
    if args.engine_options:
        try:
            engine_options(args)  # fail early on a bad key or value
        except (TypeError, ValueError) as exc:
            ap.error(f"--option: {exc}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    doc["commands"].append(command)
    doc["machine"] = machine_info()
    doc["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    done = {(r["pipeline"], r["method"], r["seed"]) for r in doc["rows"]}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    workdir = Path(tempfile.mkdtemp(prefix="eeipu-evaluate-"))
    try:
        for layout in layouts:
            for seed in _seeds(args.seeds):
                for method in methods:
                    label = args.label or (
                        method if args.workers == 1 else f"{method}-w{args.workers}"
                    )
                    if (layout, label, seed) in done:
                        continue
                    row = run_one(method, label, layout, seed, args, workdir)
                    doc["rows"].append(row)
                    regret = optima[layout] - row["best"] if layout in optima else math.nan
                    print(f"{layout:<8} {label:<14} {seed:>3} trials {row['trials']:>4} "
                          f"cand {row['candidates']:>4} best {row['best']:>9.4f} "
                          f"regret {regret:>8.4f} memo {row['memo']:>4} "
                          f"wall {row['wall_s']:>6.1f}s", flush=True)
                    doc = _save_row(path, doc, row, command)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(doc["rows"], doc["commands"], doc["machine"], optima, focus, out)
    print(f"wrote {out.with_suffix('.md')} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
