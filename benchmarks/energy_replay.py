"""SM2 against ASHA on recorded learning curves: many streams, no measurement noise.

``benchmarks/energy.py`` runs the three methods as real Tune experiments, ten
seeds at a time; on a shared 2-core VM a configuration's measured energy varies
by 10-30% between runs, as much as SM2 and ASHA differ. This benchmark
separates the schedulers' decisions from that noise, in two steps:

``record``
    Trains configurations of the CNN pipeline (its own search space, drawn with
    a seeded generator) once each, one after another, through the real runner
    (``run_pipeline``, the energy meter chosen as for trials), and writes every
    per-epoch report (validation accuracy, energy so far: joules where a meter
    measured them, and process CPU seconds) and the final score to a JSON-lines
    file. On a GPU machine ``--device cuda`` records NVML joules: a few minutes
    of device time give curves that can be replayed offline as often as wanted.

``replay``
    Shuffles the recorded configurations into ``--streams`` orders and feeds
    each stream, one trial at a time and report by report, to the *real*
    schedulers (Ray's ``ASHAScheduler`` and :class:`eeipu_ray.tune.SM2Scheduler`
    objects, called as Tune's controller calls them: ``on_trial_add``,
    ``on_trial_result``, ``on_trial_complete``), with the same targets, budget
    and stopping as ``energy.py`` (first ``--trials`` configurations for fifo;
    targets the quantiles of their final scores; budget a fraction of what they
    spent; the experiment ends once the budget is spent). A configuration costs
    the same in every method's replay, so the comparison is paired exactly.

It also reports what bounds any scheduler whose first rung is one epoch (the
*oracle*: every configuration that will not reach the target is stopped after
its first report, the first that will is run to it), where the early-stopping
methods spent their energy before reaching the target, and how energy per
epoch relates to accuracy among the recorded configurations (an energy-aware
rule can only save energy where configurations of equal accuracy differ in
energy).

The streams share one pool of configurations, so they are not independent
draws from the search space; the sign test below treats them as if they were,
which overstates the certainty when the pool is small.

Examples::

    # writes benchmarks/results/energy_traces/seed<N>.jsonl, then energy_replay.{md,json}
    python benchmarks/energy_replay.py record --configs 200 --seed 0
    python benchmarks/energy_replay.py replay --streams 300
    python benchmarks/energy_replay.py record --device cuda --out /tmp/gpu_traces.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from energy import quantile  # the same quantile as energy.py's targets

RESULTS = Path(__file__).resolve().parent / "results"
TRACES = RESULTS / "energy_traces"  # one file per recording seed: seed<N>.jsonl
CPU_KEY = "total_cpu_seconds"
JOULE_KEY = "total_energy_joules"


# ---------------------------------------------------------------- record
def sample_config(space: Mapping[str, Any], rng: Any) -> dict[str, Any]:
    """One configuration from a nested Tune search space (constants kept)."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, Mapping):
            out[key] = sample_config(value, rng)
        elif hasattr(value, "sample"):
            drawn = value.sample(random_state=rng)
            out[key] = drawn.item() if hasattr(drawn, "item") else drawn
        else:
            out[key] = value
    return out


def record(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from eeipu_ray.pipeline.runner import run_pipeline
    from eeipu_ray.pipelines import cnn

    torch.set_num_threads(args.threads)  # as a Tune trial with num_cpus=threads
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device here")
    pipeline = cnn.build_pipeline(
        n_samples=args.n_samples,
        image_size=args.image_size,
        max_epochs=args.max_epochs,
        report_score=True,
    )
    rng = np.random.default_rng(args.seed)
    out = Path(args.out) if args.out else TRACES / f"seed{args.seed}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    meta = {
        "command": _command(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "func")},
        "machine": machine_info(),
    }
    started = time.perf_counter()
    with partial.open("w") as fh:
        fh.write(json.dumps({"meta": meta}) + "\n")
        for i in range(args.configs):
            if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                print(f"--max-seconds {args.max_seconds:g} reached after {i} configurations")
                break
            config = sample_config(pipeline.search_space, rng)
            reports: list[dict[str, Any]] = []

            def keep(progress: dict[str, Any], reports: list = reports) -> None:
                if progress.get("score") is not None:
                    reports.append(
                        {k: progress.get(k) for k in ("epoch", "score", CPU_KEY, JOULE_KEY)}
                    )

            run = run_pipeline(pipeline, config, None, device=device, reporter=keep)
            result = run.to_result("score")
            sources = sorted({s.energy_source for s in run.stages if s.energy_source})
            trace = {
                "config": config,
                "reports": reports,
                "final": {
                    "score": result["score"],
                    CPU_KEY: run.total_cpu_seconds,
                    JOULE_KEY: run.total_energy_joules,
                },
                "energy_source": "+".join(sources) or "none",
            }
            fh.write(json.dumps(trace) + "\n")
            fh.flush()
            if (i + 1) % 10 == 0 or i + 1 == args.configs:
                print(
                    f"{i + 1}/{args.configs} configurations recorded "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    partial.replace(out)  # a run cut short never leaves a truncated trace file
    print(f"wrote {out}")
    return 0


def load_traces(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(meta, traces)`` of a file written by ``record``."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or "meta" not in lines[0]:
        raise SystemExit(f"{path}: not a trace file written by `energy_replay.py record`")
    traces = lines[1:]
    if not traces:
        raise SystemExit(f"{path}: no traces")
    for i, t in enumerate(traces):
        if not t.get("reports"):
            raise SystemExit(f"{path}: trace {i} has no per-epoch reports")
    return lines[0]["meta"], traces


def energy_unit(traces: list[dict[str, Any]]) -> tuple[str, str]:
    """``(key, label)``: measured joules when every report has them, else CPU-seconds."""
    if all(r.get(JOULE_KEY) is not None for t in traces for r in [*t["reports"], t["final"]]):
        sources = sorted({t["energy_source"] for t in traces})
        return JOULE_KEY, f"J ({', '.join(sources)}, measured)"
    return CPU_KEY, "CPU-s (process CPU time; no energy meter where recorded)"


# ---------------------------------------------------------------- replay
def make_scheduler(method: str, args: argparse.Namespace, energy_key: str) -> Any:
    """The scheduler object of ``method`` (``asha``, or ``sm2`` / ``sm2@<alpha>``)."""
    from ray.tune.schedulers import ASHAScheduler

    from eeipu_ray.tune import SM2Scheduler

    common = {"metric": "score", "mode": "max", "max_t": args.max_epochs}
    if method == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            grace_period=args.grace,
            reduction_factor=args.reduction_factor,
            stop_last_trials=False,
            **common,
        )
    alpha = float(method.split("@", 1)[1]) if "@" in method else args.energy_weight
    return SM2Scheduler(
        "epoch",
        energy_attr=energy_key,
        grace_period=args.grace,
        reduction_factor=args.reduction_factor,
        energy_weight=alpha,
        **common,
    )


def replay(
    stream: list[dict[str, Any]],
    scheduler: Any,
    energy_key: str,
    budget: float,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """One method over one stream, a trial at a time, as Tune would drive it.

    ``scheduler=None`` never stops a trial (fifo); ``limit`` caps the
    configurations; the experiment ends at the first result at which the spent
    energy reaches ``budget`` (the Stopper of ``energy.py``). Returns one entry
    per configuration started: the ``(energy so far, accuracy)`` points it
    reported, what it spent and whether it was stopped early.
    """
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    runs: list[dict[str, Any]] = []
    spent = 0.0
    for i, trace in enumerate(stream[:limit]):
        if spent >= budget:
            break
        trial = Trial("replay", config=trace["config"], trial_id=f"r{i:05d}", stub=True)
        if scheduler is not None:
            scheduler.on_trial_add(None, trial)
        points: list[tuple[float, float]] = []
        results = [
            {"epoch": r["epoch"], "score": r["score"], energy_key: r[energy_key]}
            for r in trace["reports"]
        ]
        final = {"score": trace["final"]["score"], energy_key: trace["final"][energy_key]}
        stopped = False
        last: dict[str, Any] = results[0]
        for result in [*results, final]:
            last = result
            points.append((float(result[energy_key]), float(result["score"])))
            if spent + float(result[energy_key]) >= budget:
                stopped = result is not final
                break
            if scheduler is not None and result is not final:
                action = scheduler.on_trial_result(None, trial, result)
                if action == TrialScheduler.STOP:
                    stopped = True
                    break
        if scheduler is not None:
            scheduler.on_trial_complete(None, trial, last)
        used = float(last[energy_key])
        runs.append({"trace": trace, "points": points, "spent": used, "stopped": stopped})
        spent += used
    return runs


def first_at(runs: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    """Cumulative energy at the first reported accuracy >= ``target``, and which run."""
    before = 0.0
    for i, run in enumerate(runs):
        for energy, acc in run["points"]:
            if acc >= target:
                return before + energy, i
        before += run["spent"]
    return None, None


def best_within(runs: list[dict[str, Any]], budget: float) -> float | None:
    before, best = 0.0, None
    for run in runs:
        for energy, acc in run["points"]:
            if before + energy <= budget:
                best = acc if best is None else max(best, acc)
        before += run["spent"]
    return best


def oracle_to_target(
    stream: list[dict[str, Any]], key: str, target: float, budget: float = math.inf
) -> float | None:
    """Energy to ``target`` if every configuration that never reaches it were stopped
    at its first report and the first one that does were run to it (``None`` when
    that takes more than ``budget``)."""
    before = 0.0
    for trace in stream:
        points = [(r[key], r["score"]) for r in trace["reports"]]
        points.append((trace["final"][key], trace["final"]["score"]))
        for energy, acc in points:
            if acc >= target:
                return before + energy if before + energy <= budget else None
        before += trace["reports"][0][key]
    return None


def spending(
    runs: list[dict[str, Any]], key: str, target: float, milestones: list[float]
) -> dict[str, float]:
    """Where energy went before the target was first reached: first reports
    (unavoidable with a first rung at epoch one) and beyond them, the latter split
    into trials that were the first to reach their highest rung (no cutoff to
    compare with) and the others."""
    _, hit = first_at(runs, target)
    upto = runs if hit is None else runs[:hit]
    arrived = {m: 0 for m in milestones}
    out = {"first_report": 0.0, "beyond_first_alone_at_rung": 0.0, "beyond_first_other": 0.0}
    for run in upto:
        first = float(run["trace"]["reports"][0][key])
        epochs = [r["epoch"] for r in run["trace"]["reports"][: len(run["points"])]]
        reached = [m for m in milestones if epochs and max(epochs) >= m]
        alone = bool(reached) and arrived[reached[-1]] == 0
        for m in reached:
            arrived[m] += 1
        out["first_report"] += min(first, run["spent"])
        beyond = max(run["spent"] - first, 0.0)
        out["beyond_first_alone_at_rung" if alone else "beyond_first_other"] += beyond
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation; ``None`` when it is undefined (a constant side)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def relation(traces: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Energy per epoch against final accuracy over the recorded configurations."""
    rate = [t["reports"][-1][key] / t["reports"][-1]["epoch"] for t in traces]
    final = [t["final"]["score"] for t in traces]
    learners = [i for i, f in enumerate(final) if f >= 0.5]
    return {
        "configs": len(traces),
        "energy_per_epoch_p10_p50_p90": [
            quantile(rate, 0.1),
            quantile(rate, 0.5),
            quantile(rate, 0.9),
        ],
        "spearman_energy_per_epoch_vs_final": spearman(rate, final),
        "learners": len(learners),
        "spearman_among_learners": spearman(
            [rate[i] for i in learners], [final[i] for i in learners]
        ),
    }


def compare(
    traces: list[dict[str, Any]],
    args: argparse.Namespace,
    key: str,
    methods: list[str],
    quantiles: list[float],
) -> tuple[dict[str, Any], dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Every method over ``args.streams`` shuffles of ``traces``:
    ``(summary per method, spending before the last target, per-stream rows)``."""
    from scipy.stats import binomtest

    from eeipu_ray.tune.sm2 import SM2Options

    milestones = SM2Options(
        max_t=args.max_epochs, grace_period=args.grace, reduction_factor=args.reduction_factor
    ).milestones
    per_stream: list[dict[str, Any]] = []
    spend: dict[str, dict[str, float]] = {m: {} for m in methods}
    for s in range(args.stream_start, args.stream_start + args.streams):
        stream = traces[:]
        random.Random(s).shuffle(stream)
        fifo = replay(stream, None, key, math.inf, limit=args.trials)
        targets = [quantile([r["trace"]["final"]["score"] for r in fifo], q) for q in quantiles]
        budget = args.budget_fraction * math.fsum(r["spent"] for r in fifo)
        row: dict[str, Any] = {"stream": s, "targets": targets, "budget": budget, "methods": {}}
        for name, runs in [("fifo", fifo)] + [
            (m, replay(stream, make_scheduler(m, args, key), key, budget)) for m in methods
        ]:
            row["methods"][name] = {
                "to_target": [first_at(runs, t)[0] for t in targets],
                "within_budget": best_within(runs, budget),
                "configs": len(runs),
                "stopped": sum(r["stopped"] for r in runs),
            }
            if name in spend:
                for k, v in spending(runs, key, targets[-1], milestones).items():
                    spend[name][k] = spend[name].get(k, 0.0) + v / args.streams
        row["methods"]["oracle"] = {
            "to_target": [oracle_to_target(stream, key, t, budget) for t in targets]
        }
        per_stream.append(row)

    summary: dict[str, Any] = {}
    for name in ["fifo", *methods, "oracle"]:
        entry: dict[str, Any] = {}
        for i, q in enumerate(quantiles):
            mine = [r["methods"][name]["to_target"][i] for r in per_stream]
            ref = [r["methods"]["asha"]["to_target"][i] for r in per_stream]
            both = [
                (a, b) for a, b in zip(mine, ref, strict=True) if a is not None and b is not None
            ]
            less = sum(_less(a, b) for a, b in zip(mine, ref, strict=True))
            more = sum(_less(b, a) for a, b in zip(mine, ref, strict=True))
            entry[f"q{q:g}"] = {
                "reached": sum(a is not None for a in mine),
                "median": statistics.median([a for a in mine if a is not None] or [math.nan]),
                "geomean_ratio_vs_asha": math.exp(
                    statistics.fmean(math.log(a / b) for a, b in both)
                )
                if both
                else None,
                "less_than_asha": less,
                "more_than_asha": more,
                "sign_test_p": binomtest(less, less + more).pvalue if less + more else None,
            }
        if name != "oracle":
            within = [r["methods"][name]["within_budget"] or 0.0 for r in per_stream]
            entry["acc_within_budget"] = statistics.fmean(within)
            entry["configs"] = statistics.fmean(r["methods"][name]["configs"] for r in per_stream)
            entry["stopped"] = statistics.fmean(r["methods"][name]["stopped"] for r in per_stream)
        summary[name] = entry
    return summary, spend, per_stream


def run_replay(args: argparse.Namespace) -> int:
    if not args.traces:
        args.traces = sorted(str(p) for p in TRACES.glob("*.jsonl"))
        if not args.traces:
            raise SystemExit(f"no trace files in {TRACES}: run `energy_replay.py record` first")
    pools = [(Path(p), *load_traces(Path(p))) for p in args.traces]
    traces = [t for _, _, pool in pools for t in pool]
    recorded = [(str(path), meta) for path, meta, _ in pools]
    key, unit = energy_unit(traces)
    methods = ["asha", *[f"sm2@{a:g}" for a in args.energy_weights]]
    quantiles = [float(q) for q in args.target_quantiles.split(",")]
    started = time.perf_counter()
    summary, spend, per_stream = compare(traces, args, key, methods, quantiles)
    by_pool: dict[str, Any] = {}
    if len(pools) > 1:  # how much the answer depends on the pool of configurations
        for path, _, pool in pools:
            by_pool[str(path)] = {"configs": len(pool)} | {
                "summary": compare(pool, args, key, methods, quantiles)[0]
            }
    wall = time.perf_counter() - started

    rel = relation(traces, key)
    text = report(args, recorded, unit, quantiles, summary, spend, rel, wall, by_pool)
    print(text)
    out = Path(args.out) if args.out else RESULTS / "energy_replay"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": _command(),
                "traces": [str(p) for p in args.traces],
                "traces_meta": [m for _, m, _ in pools],
                "unit": unit,
                "energy_key": key,
                "settings": {k: v for k, v in vars(args).items() if k not in ("out", "func")},
                "summary": summary,
                "spending_before_target": spend,
                "relation": rel,
                "by_pool": by_pool,
                "streams": per_stream,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _less(a: float | None, b: float | None) -> bool:
    """``a`` needed less than ``b`` (not reaching counts as needing more)."""
    fa = math.inf if a is None else a
    fb = math.inf if b is None else b
    return fa < fb - 1e-12


def report(
    args: argparse.Namespace,
    recorded: list[tuple[str, dict[str, Any]]],
    unit: str,
    quantiles: list[float],
    summary: dict[str, Any],
    spend: dict[str, dict[str, float]],
    rel: dict[str, Any],
    wall: float,
    by_pool: dict[str, Any] | None = None,
) -> str:
    short = unit.split(maxsplit=1)[0]
    n = args.streams
    lines = [
        "# SM2 vs ASHA replayed on recorded CNN learning curves",
        "",
        f"Command: `{_command()}`. Traces: "
        + "; ".join(
            f"`{Path(path).name}` recorded with `{meta.get('command', '?')}` on "
            f"{meta.get('machine', {}).get('cpus', '?')} CPUs"
            for path, meta in recorded
        )
        + ".",
        "",
        f"Energy unit: **{unit}**. {rel['configs']} recorded configurations, {n} shuffled "
        f"streams; per stream fifo = the first {args.trials}, targets = quantiles of their "
        f"final scores, budget = {args.budget_fraction:g} x what they spent. Rungs at epochs "
        f"{args.grace:g} x {args.reduction_factor:g}^k below {args.max_epochs}. The real "
        f"`ASHAScheduler` and `SM2Scheduler` objects decide; each configuration costs the "
        "same in every replay, so the comparison is exactly paired. 'less/more' count the "
        "streams where a method needed less/more than ASHA (not reaching the target counts "
        "as more); the sign-test p treats the streams as independent, which they are not "
        "(one pool of configurations).",
        "",
    ]
    head = ["method"]
    for q in quantiles:
        head += [
            f"median {short} to q{q:g}",
            "reached",
            "ratio vs ASHA (geomean)",
            "less/more",
            "p",
        ]
    head += ["acc within budget", "configs", "stopped"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in summary.items():
        cells = [name]
        for q in quantiles:
            e = entry[f"q{q:g}"]
            ratio = e["geomean_ratio_vs_asha"]
            p = e["sign_test_p"]
            cells += [
                f"{e['median']:.3g}",
                f"{e['reached']}/{n}",
                "-" if ratio is None else f"{ratio:.3f}",
                f"{e['less_than_asha']}/{e['more_than_asha']}",
                "-" if p is None else f"{p:.2g}",
            ]
        if "acc_within_budget" in entry:
            cells += [
                f"{entry['acc_within_budget']:.4f}",
                f"{entry['configs']:.1f}",
                f"{entry['stopped']:.1f}",
            ]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "oracle: every configuration that never reaches the target stopped after its first "
        "report, the first that does run to it, within the same budget (a bound for any "
        "scheduler whose first rung is one epoch, in that stream order).",
        "",
        f"Where the energy went before the q{quantiles[-1]:g} target was first reached "
        f"(mean {short} per stream):",
        "",
        "| method | first reports | beyond, trials alone at their top rung "
        "| beyond, other trials |",
        "|---|---|---|---|",
    ]
    for name, parts in spend.items():
        lines.append(
            f"| {name} | {parts.get('first_report', 0):.3g} | "
            f"{parts.get('beyond_first_alone_at_rung', 0):.3g} | "
            f"{parts.get('beyond_first_other', 0):.3g} |"
        )
    p10, p50, p90 = rel["energy_per_epoch_p10_p50_p90"]
    among = rel["spearman_among_learners"]
    lines += [
        "",
        f"Energy per epoch over the recorded configurations: p10 {p10:.3g}, median {p50:.3g}, "
        f"p90 {p90:.3g} {short}; Spearman correlation with the final accuracy "
        + _signed(rel["spearman_energy_per_epoch_vs_final"])
        + " (all), "
        + _signed(among)
        + f" among the {rel['learners']} that reached accuracy 0.5. A positive correlation "
        "means the configurations that cost more per epoch also end more accurate, which "
        "leaves an energy penalty little to remove without removing accuracy.",
        "",
    ]
    if by_pool:
        names = [m for m in summary if m not in ("fifo", "asha", "oracle")]
        head = ["pool", "configs"] + [f"{m} q{q:g}" for m in names for q in quantiles]
        lines += [
            "",
            "The same comparison within each pool of recorded configurations (geomean ratio "
            "vs ASHA, less/more):",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for path, pool in by_pool.items():
            cells = [f"`{Path(path).name}`", str(pool["configs"])]
            for m in names:
                for q in quantiles:
                    e = pool["summary"][m][f"q{q:g}"]
                    ratio = e["geomean_ratio_vs_asha"]
                    cells.append(
                        ("-" if ratio is None else f"{ratio:.3f}")
                        + f" ({e['less_than_asha']}/{e['more_than_asha']})"
                    )
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Replay wall time {wall:.0f} s."]
    return "\n".join(lines)


# ---------------------------------------------------------------- cli
def machine_info() -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train configurations once, write their curves")
    rec.add_argument("--configs", type=int, default=200)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:0 (NVML joules)")
    rec.add_argument("--threads", type=int, default=1, help="torch threads (a trial's CPUs)")
    rec.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="start no configuration after this long (the file is complete either way)",
    )
    rec.add_argument("--n-samples", type=int, default=None)
    rec.add_argument("--image-size", type=int, default=16)
    rec.add_argument("--max-epochs", type=int, default=8)
    rec.add_argument("--out", default=None, help=f"trace file (default {TRACES}/seed<N>.jsonl)")
    rec.set_defaults(func=record)
    rep = sub.add_parser("replay", help="replay ASHA and SM2 over recorded curves")
    rep.add_argument(
        "--traces",
        nargs="+",
        default=None,
        help=f"trace files (pools), replayed together and one by one (default {TRACES}/*.jsonl)",
    )
    rep.add_argument("--streams", type=int, default=300)
    rep.add_argument("--stream-start", type=int, default=0)
    rep.add_argument("--trials", type=int, default=16)
    rep.add_argument("--max-epochs", type=int, default=8)
    rep.add_argument("--grace", type=float, default=1)
    rep.add_argument("--reduction-factor", type=float, default=3)
    rep.add_argument("--energy-weight", type=float, default=0.05, help="SM2's default alpha")
    rep.add_argument(
        "--energy-weights", type=_floats, default=[0.02, 0.05, 0.1, 0.2], help="alphas replayed"
    )
    rep.add_argument("--target-quantiles", default="0.75,0.9")
    rep.add_argument("--budget-fraction", type=float, default=0.5)
    rep.add_argument("--out", default=None, help="output path without suffix")
    rep.set_defaults(func=run_replay)
    args = ap.parse_args(list(argv) if argv is not None else None)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
