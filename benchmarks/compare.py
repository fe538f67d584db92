"""Side-by-side comparison: EEIPU against the paper's baselines and the peers.

One command runs, for each pipeline, each method over N seeds at the same
budget. Every run is a real Ray Tune experiment (``tune.Tuner``) of
``pipeline.as_trainable(cache=...)`` trials against a fresh local
:class:`~eeipu_ray.cache.PrefixCache`, sequential (one trial at a time), until
the method has spent the budget. It writes ``OUT.md`` (tables), ``OUT.json``
(every run, with its cost/best-so-far curve) and ``OUT_<pipeline>.png`` /
``OUT_candidates.png`` (plots).

Methods (``--methods``):

==============  ===========================================================
``eeipu``       :class:`~eeipu_ray.tune.EEIPUSearcher` (memoization- and cost-aware)
``ei``          same engine and GP, expected improvement, no cost model
``eips``        EI per unit of predicted cost (one total-cost GP)
``carbo``       EI / cost^eta with cost cooling (one total-cost GP)
``eeipu_gittins`` memoization-aware Pandora's-box Gittins index (EEIPU's stage
                costs, prefix pool and cooling; ``eeipu_ray.search.strategies.gittins``)
``ms_bo``       EI over the last stage; earlier stages drawn at random
                (``benchmarks/baselines.py``)
``lambo``       LaMBO (Lin et al., UAI 2021): a slowly moving bandit over a
                tree partition of the upstream stages (``benchmarks/baselines.py``)
``random``      the engine's Sobol warm-up, then uniform random configs
``optuna_tpe``  Optuna's TPE through Ray's ``OptunaSearch``
``optuna_gp``   Optuna's GPSampler through Ray's ``OptunaSearch``
==============  ===========================================================

Every method starts with ``--warmup`` initial points (the engine-based methods,
MS_BO and LaMBO share the same Sobol points for a seed; Optuna's samplers use
their own ``n_startup_trials`` random points). Methods other than the engine's
run under :class:`BudgetLimiter`, which applies the engine's rule: a new trial
starts while the cost charged so far (the trials' ``total_cost``: computed
stages at their cost, loaded stages at their load cost) is below the budget.

Pipelines (``--pipelines``): the synthetic layouts of
:mod:`eeipu_ray.pipelines.synthetic` (``paper``: the paper-compatible 3-stage
pipeline; ``front4``: 4 stages, the first dominates the cost; ``back5``: 5
stages, the last dominates; ``flat4``: near-uniform costs; ``costly3``: the
best configurations are the expensive ones; declared costs, a run takes
seconds) and the real
CPU pipelines ``stacking`` and ``cnn`` (measured wall-clock seconds).

Metrics per method, mean ± standard error over seeds:

* ``candidates``: trials completed after the warm-up within the budget
  (the paper's "BO iterations");
* ``best``: best objective at the end;
* ``gain``: ``best`` minus the best warm-up objective (the paper's metric);
* relative to EI: ``% more candidates`` = 100 (mean candidates / EI's - 1) and
  ``% more gain`` likewise (ratios of means over seeds, per pipeline; the
  suite's figure is their mean over pipelines, as the paper averages).

Examples::

    python benchmarks/compare.py --suite synthetic --seeds 10
    python benchmarks/compare.py --suite real --seeds 3
    python benchmarks/compare.py --smoke --out /tmp/smoke
    python benchmarks/compare.py --pipelines paper --methods eeipu,ei --seeds 5 \\
        --seed-start 10 --append
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pickle
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from eeipu_ray import result as R

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_sweep import f, load_rows, machine_info, mean_se

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = (
    "eeipu",
    "ei",
    "eips",
    "carbo",
    "eeipu_gittins",
    "ms_bo",
    "lambo",
    "random",
    "optuna_tpe",
    "optuna_gp",
)
ENGINE_METHODS = ("eeipu", "ei", "eips", "carbo", "eeipu_gittins", "random")
PAPER = {"candidates": 103.0, "gain": 108.0}  # the paper's average % over EI
GOAL = {"candidates": 150.0, "gain": 108.0}  # the targets these benchmarks are held to


@dataclass(frozen=True)
class PipelineSpec:
    """A benchmark pipeline: how to build it and its default run settings."""

    name: str
    build: Callable[[], Any]
    budget: float
    warmup: int
    unit: str
    description: str
    suite: str


def _synthetic(layout: str) -> Callable[[], Any]:
    def build() -> Any:
        from eeipu_ray.pipelines.synthetic import build_pipeline

        return build_pipeline(layout=layout) if layout != "paper" else build_pipeline()

    return build


def _real(module: str, **kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        import importlib

        return importlib.import_module(f"eeipu_ray.pipelines.{module}").build_pipeline(**kwargs)

    return build


SYNTHETIC_LAYOUTS = {
    "paper": "3 stages (2, 3, 2 dims): -Beale - Hartmann3 - Branin, the paper's costs",
    "front4": "4 stages, the first dominates the cost",
    "back5": "5 stages, the last dominates the cost",
    "flat4": "4 stages of near-uniform cost (costs carry almost no information)",
    "costly3": "3 stages, the best configurations are the expensive ones",
}

PIPELINES: dict[str, PipelineSpec] = {
    **{
        name: PipelineSpec(name, _synthetic(name), 200.0, 10, "cost units", text, "synthetic")
        for name, text in SYNTHETIC_LAYOUTS.items()
    },
    "stacking": PipelineSpec(
        "stacking", _real("stacking"), 120.0, 8, "s",
        "stacking ensemble (data -> 4 base learners, out-of-fold -> meta learner), "
        "validation accuracy", "real",
    ),
    "cnn": PipelineSpec(
        "cnn", _real("cnn"), 120.0, 8, "s",
        "CNN on 8x8 digits (preprocess/augment -> train -> evaluate), validation accuracy",
        "real",
    ),
    "t5": PipelineSpec(
        "t5", _real("t5"), 150.0, 6, "s",
        "T5 teacher fine-tuning -> distillation into a half-depth student in three cached "
        "segments (the main job's pipeline: tiny T5 from a config, the shipped toy set), "
        "ROUGE-L on the held-out split", "real",
    ),
}
SUITES = {
    "synthetic": ["paper", "front4", "back5", "flat4", "costly3"],
    "real": ["stacking", "cnn", "t5"],
    "all": list(PIPELINES),
}


# --------------------------------------------------------------------------
# Budget for searchers that have none of their own
# --------------------------------------------------------------------------


class BudgetLimiter(Searcher):
    """Wraps a Tune ``Searcher``: one trial at a time, and no new trial once the
    cost charged so far reaches ``budget`` (the EEIPU engine's rule).

    A trial is charged its reported ``cost_key`` (``total_cost``: what it spent
    on each stage, computed or loaded); a failed trial without a result is
    charged nothing.

    Args:
        searcher: The wrapped searcher (e.g. ``OptunaSearch``).
        budget: Total cost units.
        cost_key: Result key holding a trial's cost.
    """

    def __init__(self, searcher: Any, budget: float, cost_key: str = R.TOTAL_COST) -> None:
        if not (isinstance(budget, int | float) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget={budget!r} must be a finite number > 0")
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.inner = searcher
        self.budget = float(budget)
        self.cost_key = cost_key
        self.spent = 0.0
        self.live: set[str] = set()
        self.done: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        ok = self.inner.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.inner.metric, self.inner.mode
        return ok

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return True  # one at a time, always (the comparison is sequential)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.spent >= self.budget:
            return self.FINISHED
        if self.live:
            return None
        config = self.inner.suggest(trial_id)
        if isinstance(config, dict):
            self.live.add(trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self.done:
            return
        self.done.add(trial_id)
        self.live.discard(trial_id)
        cost = (result or {}).get(self.cost_key)
        if isinstance(cost, int | float) and math.isfinite(cost) and cost > 0:
            self.spent += float(cost)
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        tmp = f"{checkpoint_path}.tmp"
        with open(tmp, "wb") as fh:
            pickle.dump(self.__dict__, fh)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


# --------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------


def engine_options(args: argparse.Namespace) -> Any:
    """The engine methods' options: defaults (or small optimizers with ``--fast``),
    then ``args.engine_options`` (a dict of overrides, for ablations) if present."""
    from eeipu_ray.search import EngineOptions

    overrides = dict(getattr(args, "engine_options", None) or {})
    if args.fast:
        base = {"num_restarts": 2, "raw_samples": 64, "mc_samples": 64, "maxiter": 20}
        return EngineOptions(**{**base, **overrides})
    return EngineOptions(**overrides)  # 10 restarts, 512 raw samples, as the reference


def make_searcher(
    method: str, pipeline: Any, spec: PipelineSpec, seed: int, args: argparse.Namespace,
    cache: Any,
) -> tuple[Any, dict[str, Any] | None]:
    """``(search_alg, param_space)`` for one run of ``method``."""
    budget, warmup = args.budget or spec.budget, args.warmup or spec.warmup
    if method in ENGINE_METHODS:
        from eeipu_ray.tune.searcher import EEIPUSearcher

        workers = getattr(args, "workers", 1)
        # Several workers: the searcher's lookahead as deployed, one proposal at a
        # time (its "auto" batch size reads wall-clock timings, which would make
        # a simulated run depend on the machine's speed).
        batch = {"batch_size": 1} if workers > 1 else {}
        searcher = EEIPUSearcher(
            pipeline, metric="score", mode="max", budget=budget, cache=cache,
            acquisition=method, max_concurrent=workers,
            options=replace(engine_options(args), n_warmup=warmup, seed=seed, **batch),
        )
        return searcher, None
    if method in ("ms_bo", "lambo"):
        from baselines import LaMBOSearcher, MSBOSearcher

        cls = MSBOSearcher if method == "ms_bo" else LaMBOSearcher
        restarts, raw = (2, 64) if args.fast else (10, 512)
        inner = cls(pipeline, metric="score", mode="max", n_warmup=warmup, seed=seed,
                    num_restarts=restarts, raw_samples=raw)
        return BudgetLimiter(inner, budget), None
    if method in ("optuna_tpe", "optuna_gp"):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = (
            optuna.samplers.TPESampler(seed=seed, n_startup_trials=warmup)
            if method == "optuna_tpe"
            else optuna.samplers.GPSampler(seed=seed, n_startup_trials=warmup)
        )
        # The space comes from Tuner(param_space=...): Tune converts it and keeps
        # the pipeline's constants in every trial's config.
        inner = OptunaSearch(metric="score", mode="max", sampler=sampler)
        return BudgetLimiter(inner, budget), pipeline.search_space
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------

# Completed trials per run, in completion order. Module-level because Tune
# may copy the callback: the driver process is the same either way.
_LOG: dict[str, list[dict[str, Any]]] = {}


def _recorder(run: str) -> Any:
    from ray.tune import Callback

    class Recorder(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _LOG.setdefault(run, []).append({"error": False, **(trial.last_result or {})})

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _LOG.setdefault(run, []).append({"error": True, **(trial.last_result or {})})

    return Recorder()


def run_one(
    method: str, spec: PipelineSpec, seed: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """One Tune experiment; returns its row (figures and curve)."""
    from ray import tune

    from eeipu_ray.cache import PrefixCache

    name = f"{spec.name}-{method}-s{seed}"
    rundir = workdir / name
    pipeline = spec.build()
    cache = PrefixCache(rundir / "cache")  # fresh per run
    search_alg, param_space = make_searcher(method, pipeline, spec, seed, args, cache)
    _LOG.pop(name, None)
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = "1"
    start = time.perf_counter()
    tuner_kwargs: dict[str, Any] = {}
    if param_space is not None:
        tuner_kwargs["param_space"] = param_space
    tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=-1, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(rundir), name="exp", verbose=0, callbacks=[_recorder(name)]
        ),
        **tuner_kwargs,
    ).fit()
    wall = time.perf_counter() - start
    row = summarize(_LOG.pop(name, []), method, spec, seed, args)
    row["wall_s"] = wall
    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return row


def summarize(
    log: list[dict[str, Any]], method: str, spec: PipelineSpec, seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Figures of one run from its trials in completion order."""
    warmup = args.warmup or spec.warmup
    spent, best = 0.0, -math.inf
    curve: list[tuple[float, float]] = []  # (cost spent, best so far) after each trial
    scores: list[float] = []
    for entry in log:
        cost = entry.get(R.TOTAL_COST)
        if isinstance(cost, int | float) and math.isfinite(cost):
            spent += float(cost)
        score = entry.get("score")
        ok = not entry["error"] and isinstance(score, int | float) and math.isfinite(score)
        if ok:
            scores.append(float(score))
            best = max(best, float(score))
        curve.append((spent, best if math.isfinite(best) else math.nan))
    done = [e for e in log if not e["error"] and isinstance(e.get("score"), int | float)]
    best_warm = max(scores[:warmup], default=math.nan)
    best_all = max(scores, default=math.nan)
    return {
        "pipeline": spec.name,
        "method": method,
        "seed": seed,
        "budget": args.budget or spec.budget,
        "warmup": warmup,
        "trials": len(log),
        "failed": sum(e["error"] for e in log),
        "candidates": max(len(done) - warmup, 0),
        "best": best_all,
        "best_warmup": best_warm,
        "gain": best_all - best_warm,
        "memo": sum(int(e.get(R.MEMOIZED_STAGES) or 0) > 0 for e in log),
        "spent": spent,
        "curve": curve,
    }


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def method_stats(rows: list[dict[str, Any]], pipeline: str) -> dict[str, dict[str, Any]]:
    """Per method: mean and standard error of each figure, and the % over EI."""
    out: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        mine = [r for r in rows if r["pipeline"] == pipeline and r["method"] == method]
        if not mine:
            continue
        stats: dict[str, Any] = {"seeds": len(mine)}
        for key in ("candidates", "best", "gain", "memo", "trials", "spent", "wall_s"):
            stats[key] = mean_se([float(r[key]) for r in mine])
        out[method] = stats
    eeipu = {r["seed"]: r["best"] for r in rows if r["pipeline"] == pipeline
             and r["method"] == "eeipu"}
    for method, stats in out.items():  # seeds on which EEIPU's best is at least this method's
        pairs = [(eeipu[r["seed"]], r["best"]) for r in rows if r["pipeline"] == pipeline
                 and r["method"] == method and r["seed"] in eeipu]
        stats["eeipu_at_least"] = (sum(a >= b for a, b in pairs), len(pairs))
    ei = out.get("ei")
    for stats in out.values():
        for key in ("candidates", "gain"):
            base = ei[key][0] if ei else math.nan
            mine = stats[key][0]
            stats[f"pct_{key}"] = (
                100.0 * (mine / base - 1.0) if ei and base > 0 and math.isfinite(mine) else math.nan
            )
    return out


def _pm(stat: tuple[float, float], digits: int = 2) -> str:
    m, se = stat
    return f"{f(m, digits)} ± {f(se, digits)}"


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:+.0f}%"


def pipeline_table(rows: list[dict[str, Any]], pipeline: str) -> list[str]:
    stats = method_stats(rows, pipeline)
    lines = [
        "| method | seeds | candidates | best | gain | % more candidates vs EI "
        "| % more gain vs EI | EEIPU's best ≥ (seeds) | memo trials | trials | wall s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in stats.items():
        wins, n = s["eeipu_at_least"]
        lines.append(
            f"| {method} | {s['seeds']} | {_pm(s['candidates'], 1)} | {_pm(s['best'], 3)} "
            f"| {_pm(s['gain'], 3)} | {_pct(s['pct_candidates'])} | {_pct(s['pct_gain'])} "
            f"| {f'{wins}/{n}' if n and method != 'eeipu' else '-'} "
            f"| {_pm(s['memo'], 1)} | {_pm(s['trials'], 1)} | {_pm(s['wall_s'], 0)} |"
        )
    return lines


def suite_summary(rows: list[dict[str, Any]], pipelines: list[str]) -> list[str]:
    """EEIPU's % over EI per pipeline, their mean, and the paper's figures and the targets."""
    lines = [
        "| pipeline | EEIPU % more candidates vs EI | EEIPU % more gain vs EI "
        "| EEIPU gain vs CArBO | EEIPU gain vs EIPS | best method (mean best) |",
        "|---|---|---|---|---|---|",
    ]
    pct_c, pct_g = [], []
    for p in pipelines:
        stats = method_stats(rows, p)
        e = stats.get("eeipu")
        if not e:
            continue
        pct_c.append(e["pct_candidates"])
        pct_g.append(e["pct_gain"])

        def versus(other: str, s: dict[str, Any] = stats, e: dict[str, Any] = e) -> str:
            if other not in s:
                return "-"
            mine, theirs = e["gain"][0], s[other]["gain"][0]
            verdict = "beats" if mine > theirs else "ties" if mine == theirs else "loses to"
            digits = 3 if f(mine, 3) != f(theirs, 3) else 5
            return f"{verdict} ({f(mine, digits)} vs {f(theirs, digits)})"

        top = max(stats, key=lambda m: stats[m]["best"][0])
        lines.append(
            f"| {p} | {_pct(e['pct_candidates'])} | {_pct(e['pct_gain'])} | {versus('carbo')} "
            f"| {versus('eips')} | {top} ({f(stats[top]['best'][0], 3)}) |"
        )
    finite_c = [v for v in pct_c if math.isfinite(v)]
    finite_g = [v for v in pct_g if math.isfinite(v)]
    if finite_c:
        mean_c = statistics.fmean(finite_c)
        mean_g = statistics.fmean(finite_g) if finite_g else math.nan
        gain_over = (
            "" if len(finite_g) == len(pct_g)
            else f" (gain over {len(finite_g)} of {len(pct_g)} pipelines: where EI gained "
            "nothing after the warm-up the % is undefined)"
        )
        lines += [
            "",
            f"Mean over pipelines: EEIPU {_pct(mean_c)} candidates and {_pct(mean_g)} gain "
            f"relative to EI (paper: +{PAPER['candidates']:.0f}% and +{PAPER['gain']:.0f}%; "
            f"goal: at least +{GOAL['candidates']:.0f}% and +{GOAL['gain']:.0f}%): "
            f"candidates goal {'met' if mean_c >= GOAL['candidates'] else 'NOT met'}, "
            f"gain goal "
            f"{'met' if math.isfinite(mean_g) and mean_g >= GOAL['gain'] else 'NOT met'}"
            f"{gain_over}.",
        ]
    return lines


def per_seed_table(rows: list[dict[str, Any]]) -> list[str]:
    cols = ["pipeline", "method", "seed", "trials", "candidates", "best", "best_warmup", "gain"]
    cols += ["memo", "spent", "wall_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = {p: i for i, p in enumerate(PIPELINES)}
    for r in sorted(rows, key=lambda r: (order.get(r["pipeline"], 99),
                                         METHODS.index(r["method"]), r["seed"])):
        lines.append("| " + " | ".join(f(r[c], 3 if c.startswith("best") or c == "gain" else 2)
                                       for c in cols) + " |")
    return lines


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def best_on_grid(curve: list[list[float]], grid: list[float]) -> list[float]:
    """Best objective after spending each grid cost (NaN before the first result)."""
    out, i, best = [], 0, math.nan
    for c in grid:
        while i < len(curve) and curve[i][0] <= c:
            if math.isfinite(curve[i][1]):
                best = curve[i][1]
            i += 1
        out.append(best)
    return out


def plot(rows: list[dict[str, Any]], pipelines: list[str], out: Path) -> list[Path]:
    """``OUT_<pipeline>.png`` (best vs cost spent) and ``OUT_candidates.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written: list[Path] = []
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    for p in pipelines:
        mine = [r for r in rows if r["pipeline"] == p]
        if not mine:
            continue
        budget = max(r["budget"] for r in mine)
        top = max(r["spent"] for r in mine)
        grid = list(np.linspace(0.0, max(budget, top), 200))
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
        floor = math.inf
        for method in METHODS:
            runs = [r for r in mine if r["method"] == method]
            if not runs:
                continue
            ys = np.array([best_on_grid(r["curve"], grid) for r in runs], dtype=float)
            valid = (~np.isnan(ys)).sum(0)
            mean = np.full(len(grid), np.nan)
            se = np.zeros(len(grid))
            for i in np.flatnonzero(valid == len(runs)):  # once every seed has a result
                mean[i] = ys[:, i].mean()
                se[i] = ys[:, i].std(ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else 0.0
            warm = [r["curve"][r["warmup"] - 1][0] for r in runs if len(r["curve"]) >= r["warmup"]]
            if warm:  # the y range starts at the worst method's best after its warm-up
                at = int(np.searchsorted(grid, max(warm)))
                if at < len(grid) and math.isfinite(mean[at]):
                    floor = min(floor, mean[at] - se[at])
            lw = 2.4 if method == "eeipu" else 1.3
            ax.plot(grid, mean, label=method, color=colors[method], lw=lw)
            ax.fill_between(grid, mean - se, mean + se, color=colors[method], alpha=0.15, lw=0)
        ax.axvline(budget, color="0.5", ls=":", lw=1)
        if math.isfinite(floor):
            top_y = ax.get_ylim()[1]
            ax.set_ylim(floor - 0.05 * (top_y - floor), top_y)
        spec = PIPELINES.get(p)
        ax.set_xlabel(f"cost spent ({spec.unit if spec else 'cost units'})")
        ax.set_ylabel("best objective so far")
        n_seeds = len({r["seed"] for r in mine})
        ax.set_title(f"{p}: best objective vs cost spent ({n_seeds} seeds, mean ± s.e.)")
        ax.legend(fontsize=8, ncol=3, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out.parent / f"{out.name}_{p}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    present = [p for p in pipelines if any(r["pipeline"] == p for r in rows)]
    if present:
        fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(present) + 2), 4.2), dpi=110)
        width = 0.8 / len(METHODS)
        for j, method in enumerate(METHODS):
            means, ses = [], []
            for p in present:
                s = method_stats(rows, p).get(method)
                means.append(s["candidates"][0] if s else math.nan)
                ses.append(s["candidates"][1] if s and math.isfinite(s["candidates"][1]) else 0.0)
            xs = np.arange(len(present)) + (j - (len(METHODS) - 1) / 2) * width
            ax.bar(xs, means, width, yerr=ses, label=method, color=colors[method], capsize=2)
        ax.set_xticks(np.arange(len(present)), present)
        ax.set_ylabel("candidates after warm-up within the budget")
        ax.set_title("Candidates per method (mean ± s.e. over seeds)")
        ax.legend(fontsize=8, ncol=3)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out.parent / f"{out.name}_candidates.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def write_results(out: Path, rows: list[dict[str, Any]], commands: list[str],
                  machine: dict[str, Any], settings: dict[str, Any]) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    pipelines = [p for p in PIPELINES if any(r["pipeline"] == p for r in rows)]
    payload = {
        "commands": commands,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": settings,
        "paper": PAPER,
        "goal": GOAL,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    images = plot(rows, pipelines, out)
    md = [
        "# EEIPU against the paper's baselines and the peers",
        "",
        "Commands (in order; `--append` runs add to the same file):",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"Machine: {machine['cpu_count']} CPUs, {machine['platform']}; load average at start "
        f"{machine['loadavg_at_start']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        "",
        f"Settings: {settings['optimizer']}; every run sequential (one trial at a time) "
        "through Ray Tune with a fresh local prefix cache; the warm-up is charged to the "
        "budget.",
        "",
        *[line for note in settings.get("notes", []) for line in (f"Note: {note}", "")],
        "## Summary: EEIPU relative to EI, CArBO and EIPS",
        "",
        *suite_summary(rows, pipelines),
        "",
    ]
    for p in pipelines:
        spec = PIPELINES[p]
        some = next(r for r in rows if r["pipeline"] == p)
        md += [
            f"## {p}: {spec.description}",
            "",
            f"Budget {some['budget']:g} {spec.unit}, {some['warmup']} warm-up points. "
            "Mean ± standard error over seeds.",
            "",
            *pipeline_table(rows, p),
            "",
            f"![best objective vs cost]({out.name}_{p}.png)",
            "",
        ]
    md += [
        "## Candidates",
        "",
        f"![candidates per method]({out.name}_candidates.png)",
        "",
        "## Per seed",
        "",
        *per_seed_table(rows),
        "",
        "candidates: trials completed after the warm-up within the budget; gain: best minus "
        "the best warm-up objective; % more ... vs EI: 100 (mean / EI's mean - 1); "
        "memo trials: trials that loaded at least one cached stage; spent: cost charged "
        "(the last trial may end past the budget).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    return images


def read_results(paths: list[Path]) -> dict[str, Any]:
    """The rows, commands, machine and settings of several result files, merged.

    Raises:
        ValueError: two files hold the same run (pipeline, method, seed), or
            their optimizer settings differ.
    """
    rows: list[dict[str, Any]] = []
    commands: list[str] = []
    machine: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    seen: dict[tuple[str, str, int], Path] = {}
    for path in paths:
        data = json.loads(path.read_text())
        machine = machine or data.get("machine", {})
        saved = data.get("settings", {})
        settings = settings or dict(saved)
        if saved.get("optimizer") != settings.get("optimizer"):
            raise ValueError(f"{path}: optimizer settings differ from {paths[0]}; not merging")
        for note in saved.get("notes", []):
            if note not in settings.setdefault("notes", []):
                settings["notes"].append(note)
        commands += [c for c in data.get("commands", []) if c not in commands]
        for r in data["rows"]:
            key = (r["pipeline"], r["method"], r["seed"])
            if key in seen:
                raise ValueError(f"run {key} is in both {seen[key]} and {path}")
            seen[key] = path
            rows.append(r)
    return {"rows": rows, "commands": commands, "machine": machine, "settings": settings}


def combine(paths: list[Path], out: Path, notes: list[str] | None = None) -> int:
    """Merge result files (rows, commands) into one report at ``out``; ``notes``
    (how the runs were made: machine sharing, pinning) are added to the settings."""
    try:
        merged = read_results(paths)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    rows, commands = merged["rows"], merged["commands"]
    machine, settings = merged["machine"], merged["settings"]
    # A seed counts only once every method present for the pipeline has run it,
    # so each table compares methods on the same seeds.
    methods = {p: {r["method"] for r in rows if r["pipeline"] == p} for p in PIPELINES}
    have: dict[tuple[str, int], set[str]] = {}
    for r in rows:
        have.setdefault((r["pipeline"], r["seed"]), set()).add(r["method"])
    partial = sorted(k for k, ms in have.items() if ms != methods[k[0]])
    if partial:
        print(f"left out (pipeline, seed) not run by every method: {partial}")
        rows = [r for r in rows if (r["pipeline"], r["seed"]) not in partial]
    for note in notes or []:
        if note not in settings.setdefault("notes", []):
            settings["notes"].append(note)
    write_results(out, rows, commands, machine, settings)
    print(f"merged {len(rows)} runs from {len(paths)} files into {out.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default=None,
                    help="pipelines to run: synthetic (paper, front4, back5, flat4, costly3), "
                    "real, all")
    ap.add_argument("--pipelines", default=None, help=f"comma list from {list(PIPELINES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {METHODS}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (synthetic 10, real 3)")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--budget", type=float, default=None, help="override every pipeline's budget")
    ap.add_argument("--warmup", type=int, default=None, help="override the warm-up size")
    ap.add_argument("--fast", action="store_true", help="small acquisition optimizers")
    ap.add_argument("--smoke", action="store_true",
                    help="1 seed, synthetic paper pipeline, budget 40, 3 warm-up points, --fast")
    ap.add_argument("--keep", action="store_true", help="keep the experiment directories")
    ap.add_argument("--append", action="store_true", help="add to the rows already in OUT.json")
    ap.add_argument("--out", default=None, help="OUT (writes OUT.md, OUT.json, OUT_*.png)")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="run nothing: merge the rows of these result files into OUT "
                    "(for sweeps split over several processes)")
    ap.add_argument("--note", action="append", default=[],
                    help="a line on how the runs were made (machine sharing, CPU pinning), "
                    "kept in OUT.md and OUT.json; may be repeated")
    args = ap.parse_args(argv)
    if args.combine:
        if not args.out:
            ap.error("--combine needs --out")
        return combine([Path(p) for p in args.combine], Path(args.out), args.note)
    if args.smoke:
        args.fast = True
        args.budget = args.budget or 40.0
        args.warmup = args.warmup or 3
        args.seeds = args.seeds or 1
        args.pipelines = args.pipelines or "paper"
    pipelines = args.pipelines.split(",") if args.pipelines else SUITES[args.suite or "synthetic"]
    unknown = set(pipelines) - set(PIPELINES)
    if unknown:
        ap.error(f"unknown pipelines {sorted(unknown)}; choose from {list(PIPELINES)}")
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {METHODS}")
    real = any(PIPELINES[p].suite == "real" for p in pipelines)
    n_seeds = args.seeds if args.seeds is not None else (3 if real else 10)
    seeds = list(range(args.seed_start, args.seed_start + n_seeds))
    suite_name = args.suite or ("real" if real else "synthetic")
    out = Path(args.out) if args.out else RESULTS / f"compare_{suite_name}"

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback cluster
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    machine = machine_info()
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    rows, commands = load_rows(out.with_suffix(".json")) if args.append else ([], [])
    commands.append(command)
    done = {(r["pipeline"], r["method"], r["seed"]) for r in rows}
    settings = {
        "optimizer": "fast acquisition optimizers (smoke)" if args.fast
        else "engine defaults (10 restarts, 512 raw samples); Optuna samplers' defaults",
        "budget_override": args.budget,
        "warmup_override": args.warmup,
        "notes": list(args.note),
    }
    workdir = Path(tempfile.mkdtemp(prefix="eeipu-compare-"))
    print(f"{'pipeline':<9} {'method':<10} {'seed':>4} {'trials':>6} {'cand':>5} {'best':>9} "
          f"{'gain':>8} {'memo':>4} {'spent':>8} {'wall_s':>7}", flush=True)
    try:
        for p in pipelines:
            spec = PIPELINES[p]
            for seed in seeds:  # methods interleaved: machine load hits them alike
                for method in methods:
                    if (p, method, seed) in done:
                        continue
                    row = run_one(method, spec, seed, args, workdir)
                    rows.append(row)
                    print(f"{p:<9} {method:<10} {seed:>4} {row['trials']:>6} "
                          f"{row['candidates']:>5} {row['best']:>9.4f} {row['gain']:>8.4f} "
                          f"{row['memo']:>4} {row['spent']:>8.2f} {row['wall_s']:>7.1f}",
                          flush=True)
                    write_results(out, copy.deepcopy(rows), commands, machine, settings)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        ray.shutdown()
    present = [p for p in PIPELINES if any(r["pipeline"] == p for r in rows)]
    print()
    for p in present:
        print(f"{p}:")
        print("\n".join(pipeline_table(rows, p)))
        print()
    print("\n".join(suite_summary(rows, present)))
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')} and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
