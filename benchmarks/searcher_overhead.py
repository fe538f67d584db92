"""Searcher overhead: median ``suggest`` latency next to Optuna's GP sampler and plain BoTorch.

For each problem size (``n`` observations, ``d`` dimensions) every method gets
the same ``n`` observations (a seeded uniform random design, evaluated on a
synthetic objective and per-stage costs), then proposes ``--repeat``
consecutive points; each proposal is evaluated and added before the next one,
as in a real loop. Only the proposal is timed; the table shows the median.

Problems (nested, multi-stage search spaces):

* ``d = 7``: the paper-compatible synthetic pipeline (stages of 2, 3 and 2
  dims; objective ``-Beale - Hartmann3 - Branin``, declared stage costs).
* ``d = 20``: 4 stages of 5 uniform ``[0, 1]`` dims; a smooth objective and a
  smooth positive cost per stage (see :func:`smooth20`).

Methods, side by side in one run:

* ``eeipu``: :class:`~eeipu_ray.search.BOEngine`, acquisition ``"eeipu"``,
  default options (10 restarts, 512 raw samples per prefix; the prefix pool);
  results carry per-stage costs.
* ``ei``: the same engine with acquisition ``"ei"``.
* ``optuna-gp``: ``optuna.samplers.GPSampler``; the observations are added with
  ``study.add_trials``, ``study.ask()`` is timed, then ``study.tell``.
* ``botorch-ei``: the loop a typical user writes: ``SingleTaskGP`` fitted from
  scratch with ``fit_gpytorch_mll`` every time, ``LogExpectedImprovement``,
  ``optimize_acqf(num_restarts=10, raw_samples=512)``.

Every method runs on one torch thread (the engine's default,
``EngineOptions.num_threads=1``; ``--threads`` sets it for the baselines, 0
leaves torch's default): on a busy 2-core machine two threads made a plain
BoTorch GP fit 20-30x slower (spin-waiting OpenMP threads), which would say
nothing about the algorithms. Optuna's GP sampler is fastest with
``greenlet`` installed (its batched L-BFGS-B); the ``bench`` extra installs
both. Without Optuna (``pip install -e .[bench]``) its column is skipped with
a note. Example::

    python benchmarks/searcher_overhead.py                  # full: n = 20, 100, 300; d = 7, 20
    python benchmarks/searcher_overhead.py --quick          # n = 20, d = 7, 3 proposals
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from eeipu_ray.pipelines.synthetic import STAGES, synthetic_objective, synthetic_space
from eeipu_ray.pipelines.synthetic import synthetic_stage_costs as paper_stage_costs
from eeipu_ray.search import BOEngine, EngineOptions, SearchSpace

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("eeipu", "ei", "optuna-gp", "botorch-ei")
GOAL_S = 1.0  # the goal: EEIPU under 1 s median at 100 observations


# --------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A nested search space with an objective (maximize) and per-stage costs."""

    name: str
    space: SearchSpace
    objective: Callable[[dict[str, Any]], float]
    stage_costs: Callable[[dict[str, Any]], list[float]]

    @property
    def dim(self) -> int:
        return self.space.dim

    def result(self, config: dict[str, Any]) -> dict[str, Any]:
        """The flat result a pipeline trial would report (objective + stage costs)."""
        costs = self.stage_costs(config)
        out: dict[str, Any] = {"score": self.objective(config)}
        for stage, cost in zip(self.space.stage_names, costs, strict=True):
            out[f"stage_costs/{stage}"] = cost
        out["total_cost"] = math.fsum(costs)
        return out


def paper7() -> Problem:
    """The paper-compatible synthetic pipeline (7 dims in 3 stages)."""
    space = SearchSpace.from_tune(synthetic_space(), stage_order=list(STAGES))
    return Problem("synthetic-7d", space, synthetic_objective, paper_stage_costs)


_S20 = [f"s{k + 1}" for k in range(4)]
_K20 = [f"x{i + 1}" for i in range(5)]


def smooth20() -> Problem:
    """4 stages x 5 uniform dims on ``[0, 1]``.

    Objective (maximize): ``-sum_i (x_i - c_i)^2 + 0.1 sum_i cos(3 pi x_i)`` with
    ``c_i`` spread over ``[0.25, 0.75]``; cost of stage ``k`` (1-based):
    ``k * (0.5 + mean_i x_{k,i}^2)``.
    """
    from ray import tune

    space = SearchSpace.from_tune(
        {s: {key: tune.uniform(0.0, 1.0) for key in _K20} for s in _S20}, stage_order=_S20
    )
    centers = [0.25 + 0.5 * i / 19 for i in range(20)]

    def values(config: dict[str, Any]) -> list[float]:
        return [float(config[s][key]) for s in _S20 for key in _K20]

    def objective(config: dict[str, Any]) -> float:
        x = values(config)
        return -math.fsum((v - c) ** 2 for v, c in zip(x, centers, strict=True)) + 0.1 * math.fsum(
            math.cos(3 * math.pi * v) for v in x
        )

    def stage_costs(config: dict[str, Any]) -> list[float]:
        return [
            (k + 1) * (0.5 + statistics.fmean(float(config[s][key]) ** 2 for key in _K20))
            for k, s in enumerate(_S20)
        ]

    return Problem("smooth-20d", space, objective, stage_costs)


PROBLEMS: dict[int, Callable[[], Problem]] = {7: paper7, 20: smooth20}


# --------------------------------------------------------------------------
# Methods: each gets the same observations, then proposes `repeat` points
# --------------------------------------------------------------------------

Observations = list[tuple[dict[str, Any], dict[str, Any]]]  # (config, result)


def observations(problem: Problem, n: int, seed: int) -> Observations:
    """``n`` uniform random configs and their results (same for every method)."""
    X = problem.space.sample(n, seed=seed)
    configs = [problem.space.from_unit(x) for x in X]
    return [(c, problem.result(c)) for c in configs]


def time_engine(
    problem: Problem, obs: Observations, repeat: int, acquisition: str, options: EngineOptions
) -> list[float]:
    engine = BOEngine(problem.space, _replace(options, acquisition=acquisition))
    for i, (config, result) in enumerate(obs):
        # register() counts towards the warm-up, as points_to_evaluate do.
        engine.register(f"obs{i}", config)
        engine.on_result(f"obs{i}", result)
    times = []
    for j in range(repeat):
        t = time.perf_counter()
        config = engine.suggest(f"new{j}")
        times.append(time.perf_counter() - t)
        assert config is not None
        engine.on_result(f"new{j}", problem.result(config))
    return times


def time_optuna(problem: Problem, obs: Observations, repeat: int, seed: int) -> list[float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {
        d.name: optuna.distributions.FloatDistribution(d.t_lower, d.t_upper)
        for d in problem.space.dims
    }

    def flat(config: dict[str, Any]) -> dict[str, float]:
        return {f"{s}/{k}": float(v) for s, sub in config.items() for k, v in sub.items()}

    def nested(params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in params.items():
            stage, key = name.split("/", 1)
            out.setdefault(stage, {})[key] = value
        return out

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GPSampler(seed=seed))
    study.add_trials(
        [
            optuna.trial.create_trial(params=flat(c), distributions=dists, value=r["score"])
            for c, r in obs
        ]
    )
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        trial = study.ask(fixed_distributions=dists)  # the GP proposal happens here
        params = dict(trial.params)
        times.append(time.perf_counter() - t)
        study.tell(trial, problem.objective(nested(params)))
    return times


def time_botorch(
    problem: Problem, obs: Observations, repeat: int, num_restarts: int, raw_samples: int
) -> list[float]:
    from botorch.acquisition import LogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

    X = torch.stack([problem.space.to_unit(c) for c, _ in obs])
    Y = torch.tensor([[r["score"]] for _, r in obs], dtype=torch.double)
    bounds = torch.stack([torch.zeros(problem.dim), torch.ones(problem.dim)]).to(X)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        model = SingleTaskGP(X, Y)  # default: Matern-5/2 ARD, standardized Y
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        acqf = LogExpectedImprovement(model, best_f=Y.max())
        candidate, _ = optimize_acqf(
            acqf, bounds=bounds, q=1, num_restarts=num_restarts, raw_samples=raw_samples
        )
        times.append(time.perf_counter() - t)
        x = candidate.detach().reshape(-1)
        X = torch.cat([X, x.unsqueeze(0)])
        Y = torch.cat([Y, torch.tensor([[problem.objective(problem.space.from_unit(x))]])])
    return times


def _replace(options: EngineOptions, **changes: Any) -> EngineOptions:
    from dataclasses import replace

    return replace(options, **changes)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import botorch
    import gpytorch
    import ray

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "botorch": botorch.__version__,
        "gpytorch": gpytorch.__version__,
        "ray": ray.__version__,
    }
    try:
        import optuna

        versions["optuna"] = optuna.__version__
    except ImportError:
        versions["optuna"] = None
    try:
        import greenlet  # noqa: F401  # Optuna's GPSampler batches L-BFGS-B with it

        has_greenlet = True
    except ImportError:
        has_greenlet = False
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_at_start": [round(v, 2) for v in load] if load else None,
        "torch_threads_baselines": torch.get_num_threads(),
        "greenlet": has_greenlet,
        "versions": versions,
    }


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def table(rows: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """Markdown rows: one line per (d, n), one column per method (median seconds)."""
    header = "| d | n | " + " | ".join(f"{m} (s)" for m in methods) + " |"
    lines = [header, "|" + "---|" * (2 + len(methods))]
    keys = sorted({(r["dim"], r["n"]) for r in rows})
    for d, n in keys:
        cells = []
        for m in methods:
            hit = [r for r in rows if (r["dim"], r["n"], r["method"]) == (d, n, m)]
            cells.append(fmt(hit[0]["median_s"]) if hit else "-")
        lines.append(f"| {d} | {n} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20,100,300", help="observation counts n")
    ap.add_argument("--dims", default="7,20", help=f"dimensions d, from {sorted(PROBLEMS)}")
    ap.add_argument(
        "--repeat", type=int, default=None, help="consecutive proposals timed (7; quick: 3)"
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads for the baselines (0: default)"
    )
    ap.add_argument("--quick", action="store_true", help="n = 20, d = 7, 3 proposals (a smoke run)")
    ap.add_argument(
        "--out",
        default=str(RESULTS / "searcher_overhead"),
        help="write OUT.md and OUT.json ('' to skip)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.dims = "20", "7"
    if args.repeat is None:
        args.repeat = 3 if args.quick else 7
    sizes = [int(v) for v in args.sizes.split(",")]
    dims = [int(v) for v in args.dims.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS) or set(dims) - set(PROBLEMS)
    if unknown:
        ap.error(f"unknown method or dimension: {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if "optuna-gp" in methods:
        try:
            import optuna  # noqa: F401
        except ImportError:
            print("note: optuna is not installed (pip install -e .[bench]); skipping optuna-gp")
            methods.remove("optuna-gp")
    warnings.filterwarnings("ignore", message=".*experimental.*")  # Optuna's GPSampler

    options = EngineOptions(n_warmup=10, seed=args.seed)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for d in dims:
        problem = PROBLEMS[d]()
        for n in sizes:
            obs = observations(problem, n, seed=args.seed + n)
            for method in methods:
                if method in ("eeipu", "ei"):
                    times = time_engine(problem, obs, args.repeat, method, options)
                elif method == "optuna-gp":
                    times = time_optuna(problem, obs, args.repeat, seed=args.seed)
                else:
                    times = time_botorch(problem, obs, args.repeat, 10, 512)
                row = {
                    "problem": problem.name,
                    "dim": d,
                    "n": n,
                    "method": method,
                    "median_s": statistics.median(times),
                    "times_s": [round(t, 4) for t in times],
                }
                rows.append(row)
                print(
                    f"  d={d:>2} n={n:>3} {method:<10} median {fmt(row['median_s'])} s  "
                    f"(all: {', '.join(fmt(t) for t in times)})",
                    flush=True,
                )
    elapsed = time.perf_counter() - t_start

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    machine = machine_info()
    lines = table(rows, methods)
    print()
    print(f"Median suggest latency (s) over {args.repeat} consecutive proposals; same observations")
    print("\n".join(lines))
    goal = [r for r in rows if r["method"] == "eeipu" and r["n"] == 100]
    for r in goal:
        verdict = "meets" if r["median_s"] < GOAL_S else "MISSES"
        print(
            f"EEIPU at n=100, d={r['dim']}: {fmt(r['median_s'])} s median ({verdict} the "
            f"< {GOAL_S:g} s goal on {machine['cpu_count']} cores)"
        )

    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "settings": {
                "sizes": sizes,
                "dims": dims,
                "repeat": args.repeat,
                "seed": args.seed,
                "engine_options": {
                    k: getattr(options, k)
                    for k in ("num_restarts", "raw_samples", "maxiter", "mc_samples", "top_q")
                },
                "engine_torch_threads": options.num_threads,
                "botorch": {"num_restarts": 10, "raw_samples": 512},
                "elapsed_s": round(elapsed, 1),
            },
            "rows": rows,
        }
        out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        md = [
            "# Searcher overhead: median suggest latency",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {machine['cpu_count']} CPUs, {machine['platform']}; "
            f"load average at start {machine['loadavg_at_start']}; "
            + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
            "",
            f"Median of {args.repeat} consecutive proposals (each evaluated and added before the "
            "next); every method starts from the same seeded uniform random observations. The "
            "engine (eeipu, ei) uses default options and 1 torch thread; optuna-gp and botorch-ei "
            f"use {machine['torch_threads_baselines']} torch thread(s). botorch-ei refits its GP "
            "from scratch on every proposal. optuna-gp: greenlet "
            f"{'installed' if machine['greenlet'] else 'NOT installed (sequential L-BFGS-B)'}.",
            "",
            *lines,
            "",
            *[
                f"EEIPU at n=100, d={r['dim']}: {fmt(r['median_s'])} s median "
                f"(goal: < {GOAL_S:g} s)."
                for r in goal
            ],
            "",
        ]
        out.with_suffix(".md").write_text("\n".join(md))
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
