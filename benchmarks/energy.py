"""SM2 against ASHA against no early stopping, on the CNN pipeline.

For each seed, the three methods draw configurations from the same stream
(Ray's ``BasicVariantGenerator`` with that seed over the CNN pipeline's own
search space: the first configurations are the same for all, which is
checked) and run them in real Ray Tune experiments, one trial at a time, each
against a fresh prefix cache:

==========  ================================================================
``fifo``    no early stopping: the first ``--trials`` configurations, each
            trained for its ``epochs``
``asha``    Ray's ``ASHAScheduler`` (rungs in epochs, ranked by accuracy)
``sm2``     :class:`~eeipu_ray.tune.SM2Scheduler` (the same rungs, ranked by
            ``S = accuracy - alpha ln(energy so far)``)
==========  ================================================================

The train stage reports its validation accuracy after every epoch
(``build_pipeline(report_score=True)``); the runner adds the energy the trial
has spent so far. Energy is the measured joules where a meter works (NVML,
RAPL) and otherwise the trials' process CPU time, reported as CPU-seconds and
never called joules. The unit is chosen once, by probing the meters where the
trials run (this machine).

The energy budget of a seed is ``--budget-fraction`` of what ``fifo`` spent on
its ``--trials`` configurations. ``asha`` and ``sm2`` draw further
configurations from the stream until they have spent that budget (a Tune
``Stopper`` ends the experiment there), so that every method gets the same
energy, and early stopping can buy more configurations with it.

Per run, with cumulative energy counted over the trials in the order they ran
(each reported result at the trial's energy so far):

* ``energy to target``: cumulative energy at the first reported validation
  accuracy (any epoch of any trial, or a final score) >= the target. Two
  targets, set per seed from ``fifo`` before the others are looked at: the
  ``--target-quantiles`` quantiles (0.75 and 0.9) of its trials' final scores;
* ``acc within budget``: the best accuracy reported while the cumulative
  energy was within the budget;
* ``configs``: configurations started within the budget; ``stopped early``.

Examples::

    python benchmarks/energy.py                      # writes benchmarks/results/energy.{md,json}
    python benchmarks/energy.py --seeds 5 --trials 24
    python benchmarks/energy.py --smoke --out /tmp/energy-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("fifo", "asha", "sm2")

# Results as Tune hands them over, per run: module-level because Tune may copy
# the callback object; the driver process is the same either way.
_LOG: dict[str, list[dict[str, Any]]] = {}


def _recorder(run: str) -> Any:
    from ray.tune import Callback

    class Recorder(Callback):
        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            _LOG.setdefault(run, []).append(
                {"trial_id": trial.trial_id, "config": trial.config, **_row(result)}
            )

    return Recorder()


def _budget_stopper(energy_key: str, budget: float) -> Any:
    from ray import tune

    class EnergyBudget(tune.Stopper):
        """Ends the experiment once the trials have spent ``budget`` (sequential trials)."""

        def __init__(self) -> None:
            self.spent: dict[str, float] = {}

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            if result.get(energy_key) is not None:
                self.spent[trial_id] = float(result[energy_key])
            return False

        def stop_all(self) -> bool:
            return math.fsum(self.spent.values()) >= budget

    return EnergyBudget()


def _row(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("score", "epoch", "total_energy_joules", "total_cpu_seconds", "memoized_stages")
    return {k: result.get(k) for k in keep}


def probe_unit() -> tuple[str, str]:
    """``(result key, label)`` of the energy the trials will report here."""
    from eeipu_ray.energy import auto_meter

    with auto_meter([]) as meter:  # CPU trials: RAPL if readable
        if meter.measured:
            return "total_energy_joules", f"J ({meter.source}, measured)"
    return "total_cpu_seconds", "CPU-s (process CPU time; no energy meter here)"


def make_scheduler(method: str, args: argparse.Namespace, energy_key: str) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from eeipu_ray.tune import SM2Scheduler

    if method == "fifo":
        return FIFOScheduler()
    if method == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=args.max_epochs,
            grace_period=args.grace,
            reduction_factor=args.reduction_factor,
            stop_last_trials=False,
        )
    return SM2Scheduler(
        time_attr="epoch",
        energy_attr=energy_key,
        max_t=args.max_epochs,
        grace_period=args.grace,
        reduction_factor=args.reduction_factor,
        energy_weight=args.energy_weight,
    )


def run_one(
    method: str,
    seed: int,
    args: argparse.Namespace,
    energy_key: str,
    workdir: Path,
    budget: float | None,
) -> dict[str, Any]:
    """One Tune experiment; returns the trials in the order they ran, with their results.

    ``budget=None``: the first ``args.trials`` configurations; else configurations
    from the stream (at most ``args.pool``) until ``budget`` is spent.
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipelines import cnn

    name = f"{method}-s{seed}"
    pipeline = cnn.build_pipeline(
        n_samples=args.n_samples,
        image_size=args.image_size,
        max_epochs=args.max_epochs,
        report_score=True,
    )
    cache = PrefixCache(workdir / name / "cache")
    _LOG.pop(name, None)
    started = time.perf_counter()
    tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        param_space=pipeline.search_space,
        tune_config=tune.TuneConfig(
            metric="score",
            mode="max",
            num_samples=args.trials if budget is None else args.pool,
            search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=1),
            scheduler=make_scheduler(method, args, energy_key),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            storage_path=str(workdir / name),
            name="exp",
            verbose=0,
            callbacks=[_recorder(name)],
            stop=None if budget is None else _budget_stopper(energy_key, budget),
        ),
    ).fit()
    wall = time.perf_counter() - started
    trials: dict[str, dict[str, Any]] = {}
    for r in _LOG.pop(name, []):
        t = trials.setdefault(r["trial_id"], {"config": r["config"], "results": []})
        t["results"].append({k: v for k, v in r.items() if k not in ("trial_id", "config")})
    return {"method": method, "seed": seed, "wall_s": wall, "trials": list(trials.values())}


def curve(run: dict[str, Any], energy_key: str) -> list[tuple[float, float]]:
    """``(cumulative energy, accuracy)`` of every reported accuracy, in run order."""
    points, spent = [], 0.0
    for trial in run["trials"]:
        last = 0.0
        for r in trial["results"]:
            energy = r.get(energy_key)
            if energy is None:
                continue
            last = float(energy)
            if r.get("score") is not None and math.isfinite(r["score"]):
                points.append((spent + last, float(r["score"])))
        spent += last
    return points


def summarize(
    run: dict[str, Any], energy_key: str, targets: list[float], budget: float
) -> dict[str, Any]:
    """The figures of one run against the seed's targets and budget."""
    points = curve(run, energy_key)
    within = [acc for e, acc in points if e <= budget]
    total, started_within, spent = 0.0, 0, 0.0
    for t in run["trials"]:
        if spent < budget:
            started_within += 1
        energies = [r[energy_key] for r in t["results"] if r.get(energy_key) is not None]
        last = float(energies[-1]) if energies else 0.0
        spent += last
        total += last
    finished = sum(
        1 for t in run["trials"] if any(r.get("memoized_stages") is not None for r in t["results"])
    )
    return {
        "method": run["method"],
        "seed": run["seed"],
        "trials": len(run["trials"]),
        "configs_within_budget": started_within,
        "stopped_early": len(run["trials"]) - finished,
        "epochs_trained": sum(
            max((r.get("epoch") or 0) for r in t["results"]) for t in run["trials"]
        ),
        "targets": targets,
        "energy_to_target": [next((e for e, acc in points if acc >= q), None) for q in targets],
        "best_within_budget": max(within) if within else None,
        "best": max((acc for _, acc in points), default=None),
        "total_energy": total,
        "budget": budget,
        "wall_s": run["wall_s"],
        "configs": [_config_id(t["config"]) for t in run["trials"]],
    }


def _config_id(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (NumPy's default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def same_stream(runs: list[dict[str, Any]]) -> bool:
    """Whether the runs drew the same configurations, as far as each got."""
    configs = [[_config_id(t["config"]) for t in r["trials"]] for r in runs]
    n = min(len(c) for c in configs)
    return n > 0 and all(c[:n] == configs[0][:n] for c in configs)


def _mean_se(values: list[float], digits: str = ".4g") -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:{digits}}"
    return f"{mean:{digits}} ± {statistics.stdev(values) / math.sqrt(len(values)):.2g}"


def tables(rows: list[dict[str, Any]], unit: str, quantiles: list[float]) -> str:
    """The side-by-side Markdown: means over seeds, then every run."""
    short = unit.split(maxsplit=1)[0]
    head = ["method"]
    for q in quantiles:
        head += [f"energy to target q{q:g} ({short})", f"reached q{q:g}"]
    head += ["acc within budget", "configs within budget", "stopped early", "best acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        cells = [method]
        for i in range(len(quantiles)):
            reached = [r["energy_to_target"][i] for r in mine if r["energy_to_target"][i]]
            cells += [_mean_se(reached), f"{len(reached)}/{len(mine)}"]
        cells += [
            _mean_se([r["best_within_budget"] or 0.0 for r in mine]),
            _mean_se([float(r["configs_within_budget"]) for r in mine], ".3g"),
            _mean_se([float(r["stopped_early"]) for r in mine], ".3g"),
            _mean_se([r["best"] or 0.0 for r in mine]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *paired(rows, quantiles, "sm2", "asha"), *paired(rows, quantiles, "sm2", "fifo")]
    head = ["seed", "method", "targets (acc)", f"budget ({short})"]
    head += [f"to q{q:g}" for q in quantiles]
    head += ["acc within budget", "best acc", "spent", "trials (stopped)", "wall s"]
    lines += ["", "Per run:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["seed"], METHODS.index(r["method"]))):
        cells = [str(r["seed"]), r["method"], " / ".join(f"{t:.4f}" for t in r["targets"])]
        cells.append(f"{r['budget']:.4g}")
        cells += ["not reached" if e is None else f"{e:.4g}" for e in r["energy_to_target"]]
        within = r["best_within_budget"]
        cells += [
            "-" if within is None else f"{within:.4f}",
            f"{r['best'] or 0:.4f}",
            f"{r['total_energy']:.4g}",
            f"{r['trials']} ({r['stopped_early']})",
            f"{r['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rows: list[dict[str, Any]], quantiles: list[float], a: str, b: str) -> list[str]:
    """Seed by seed, ``a`` against ``b``: who needed less energy to each target
    (not reaching it counts as needing more), the median ratio where both
    reached it, and the accuracy within the budget."""
    by_seed = {(r["seed"], r["method"]): r for r in rows}
    seeds = sorted({s for s, m in by_seed if m == a and (s, b) in by_seed})
    if not seeds:
        return []
    parts = []
    for i, q in enumerate(quantiles):
        less = more = 0
        ratios = []
        for s in seeds:
            ea, eb = by_seed[s, a]["energy_to_target"][i], by_seed[s, b]["energy_to_target"][i]
            fa, fb = math.inf if ea is None else ea, math.inf if eb is None else eb
            less += fa < fb
            more += fa > fb
            if ea is not None and eb is not None:
                ratios.append(ea / eb)
        median = f"{statistics.median(ratios):.2f}" if ratios else "-"
        parts.append(
            f"target q{q:g}: {a} needed less energy on {less}, more on {more} of {len(seeds)} "
            f"seeds (median {a}/{b} ratio where both reached it: {median})"
        )
    acc = [by_seed[s, a]["best_within_budget"] or 0.0 for s in seeds]
    ref = [by_seed[s, b]["best_within_budget"] or 0.0 for s in seeds]
    better = sum(x > y for x, y in zip(acc, ref, strict=True))
    worse = sum(x < y for x, y in zip(acc, ref, strict=True))
    parts.append(f"accuracy within the budget: {a} higher on {better}, lower on {worse}")
    return [f"Paired, {a} against {b}: " + "; ".join(parts) + "."]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--trials", type=int, default=16, help="configurations of the fifo run")
    ap.add_argument(
        "--pool", type=int, default=None, help="most configurations asha/sm2 may draw (4x trials)"
    )
    ap.add_argument("--n-samples", type=int, default=None, help="digits used (default all)")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--grace", type=float, default=1)
    ap.add_argument("--reduction-factor", type=float, default=3)
    ap.add_argument("--energy-weight", type=float, default=0.05, help="SM2's alpha")
    ap.add_argument("--target-quantiles", default="0.75,0.9")
    ap.add_argument("--budget-fraction", type=float, default=0.5)
    ap.add_argument("--smoke", action="store_true", help="a tiny run")
    ap.add_argument("--out", default=None, help="output path without suffix")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.trials, args.n_samples = 1, 4, 200
        args.image_size, args.max_epochs = 8, 3
    args.pool = args.pool or 4 * args.trials
    quantiles = [float(q) for q in args.target_quantiles.split(",")]
    out = Path(args.out) if args.out else RESULTS / "energy"
    out.parent.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback cluster
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    energy_key, unit = probe_unit()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    print(f"energy unit: {unit}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="eeipu-energy-"))
    rows: list[dict[str, Any]] = []
    try:
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            fifo = run_one("fifo", seed, args, energy_key, workdir, budget=None)
            finals = [
                r["score"]
                for t in fifo["trials"]
                for r in t["results"]
                if r.get("memoized_stages") is not None and r.get("score") is not None
            ]
            targets = [quantile(finals, q) for q in quantiles]
            fifo_spent = summarize(fifo, energy_key, targets, math.inf)["total_energy"]
            budget = args.budget_fraction * fifo_spent
            runs = [fifo] + [
                run_one(m, seed, args, energy_key, workdir, budget=budget) for m in METHODS[1:]
            ]
            if not same_stream(runs):
                raise SystemExit(f"seed {seed}: the methods did not draw the same configurations")
            for run in runs:
                row = summarize(run, energy_key, targets, budget)
                rows.append(row)
                reached = ", ".join(
                    "-" if e is None else f"{e:.3g}" for e in row["energy_to_target"]
                )
                print(
                    f"seed {seed} {run['method']:<5} to targets [{reached}] within budget "
                    f"{row['best_within_budget'] or 0:.4f} spent {row['total_energy']:.4g} "
                    f"of {budget:.4g}; trials {row['trials']} (stopped {row['stopped_early']}); "
                    f"wall {row['wall_s']:.0f}s",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        ray.shutdown()

    table = tables(rows, unit, quantiles)
    print()
    print(table)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    header = [
        "# SM2 vs ASHA vs no early stopping: CNN pipeline",
        "",
        f"Command: `{command}`",
        "",
        f"Energy unit: **{unit}**. Settings: `{json.dumps(settings)}`. Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "One stream of configurations per seed for the three methods (checked), one trial "
        "at a time. fifo trains the first `trials` configurations; asha and sm2 draw from the "
        "same stream until they have spent the budget (`budget_fraction` of what fifo spent). "
        "Targets per seed: quantiles of fifo's final scores. Means ± standard error over "
        "seeds; 'energy to target' averages the runs that reached it (see the paired lines "
        "for a like-for-like comparison).",
        "",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(header) + table + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": command,
                "unit": unit,
                "energy_key": energy_key,
                "settings": settings,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
