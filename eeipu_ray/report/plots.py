"""The report's PNG plots, drawn with matplotlib's Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` on a ``FigureCanvasAgg``:
no pyplot, no global backend switch, nothing needs a display. matplotlib is
imported when a plot is drawn, not when this module is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eeipu_ray.report.experiment import Experiment, ReportError
from eeipu_ray.report.series import (
    best_so_far,
    cache_hits_per_stage,
    eta_series,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGSIZE = (8.0, 4.5)  # inches; at DPI: 800 x 450 pixels
DPI = 100

PLOTS = {
    "best_objective": "best_objective.png",
    "stage_costs": "stage_costs.png",
    "cache_hits": "cache_hits.png",
    "eta": "eta.png",
}


def draw_all(experiment: Experiment, out_dir: Path) -> dict[str, Path]:
    """Draw every plot that has data into ``out_dir``.

    Returns:
        Plot name (the keys of :data:`PLOTS`) to PNG path; ``"eta"`` is absent
        when the cost-cooling exponent is unavailable.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "best_objective": _save(_best_objective(experiment), out_dir / PLOTS["best_objective"]),
        "stage_costs": _save(_stage_costs(experiment), out_dir / PLOTS["stage_costs"]),
        "cache_hits": _save(_cache_hits(experiment), out_dir / PLOTS["cache_hits"]),
    }
    eta_figure = _eta(experiment)
    if eta_figure is not None:
        paths["eta"] = _save(eta_figure, out_dir / PLOTS["eta"])
    return paths


# --------------------------------------------------------------------------
# Private helpers: one per plot
# --------------------------------------------------------------------------


def _figure(nrows: int = 1, ncols: int = 1) -> tuple[Figure, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(
            "eeipu-ray report needs matplotlib for its plots: pip install 'eeipu-ray[report]'"
        ) from exc
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _best_objective(experiment: Experiment) -> Figure:
    fig, axes = _figure()
    ax = axes[0, 0]
    series = best_so_far(experiment)
    ax.set_title(f"Best {experiment.metric} versus cost spent")
    if not any(math.isfinite(v) for v in series.objective):
        _empty(ax, "no completed trials")
        return fig
    ax.step(series.cost, series.best, where="post", color="tab:blue", label="best so far")
    fresh = [
        (c, y)
        for c, y, m in zip(series.cost, series.objective, series.memoized, strict=True)
        if not m and math.isfinite(y)
    ]
    reused = [
        (c, y)
        for c, y, m in zip(series.cost, series.objective, series.memoized, strict=True)
        if m and math.isfinite(y)
    ]
    if fresh:
        ax.scatter(
            *zip(*fresh, strict=True), s=18, color="tab:gray", label="trial, run from scratch"
        )
    if reused:
        ax.scatter(
            *zip(*reused, strict=True),
            s=22,
            marker="D",
            color="tab:orange",
            label="trial, started from a cached prefix",
        )
    if experiment.budget is not None:
        ax.axvline(float(experiment.budget), color="tab:red", linestyle="--", label="budget")
    ax.set_xlabel("cost spent (charged cost, cumulative)")
    ax.set_ylabel(f"{experiment.metric} ({experiment.mode})")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _stage_costs(experiment: Experiment) -> Figure:
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.set_title("Per-stage cost per trial (hatched: loaded from the cache)")
    trials, stages = experiment.trials, experiment.stage_names
    if not trials or not stages:
        _empty(ax, "no per-stage costs reported")
        return fig
    colors = [f"C{i % 10}" for i in range(len(stages))]
    x = list(range(1, len(trials) + 1))
    bottom = [0.0] * len(trials)
    for stage, color in zip(stages, colors, strict=True):
        computed = [
            0.0 if t.cache_hit.get(stage) else t.stage_costs.get(stage, 0.0) for t in trials
        ]
        # A loaded stage is drawn at the compute cost it saved: its load time is tiny.
        saved = [t.compute_costs.get(stage, 0.0) if t.cache_hit.get(stage) else 0.0 for t in trials]
        ax.bar(x, computed, bottom=bottom, color=color, label=f"{stage}: computed")
        bottom = [b + c for b, c in zip(bottom, computed, strict=True)]
        if any(saved):
            ax.bar(
                x,
                saved,
                bottom=bottom,
                facecolor="none",
                edgecolor=color,
                hatch="///",
                linewidth=0.8,
                label=f"{stage}: loaded (compute cost saved)",
            )
            bottom = [b + s for b, s in zip(bottom, saved, strict=True)]
    charged = [t.charged_cost for t in trials]
    ax.scatter(x, charged, marker="_", s=120, color="black", zorder=3, label="charged cost")
    ax.set_xlabel("trial (completion order)")
    ax.set_ylabel("cost")
    _integer_ticks(ax, len(trials))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _cache_hits(experiment: Experiment) -> Figure:
    fig, axes = _figure(1, 2)
    from matplotlib.ticker import MaxNLocator  # after _figure: it checks matplotlib is there

    left, right = axes[0, 0], axes[0, 1]
    trials = experiment.trials
    left.set_title("Memoized stages per trial")
    if trials:
        x = list(range(1, len(trials) + 1))
        left.bar(x, [t.memoized_stages for t in trials], color="tab:orange")
        left.set_xlabel("trial (completion order)")
        left.set_ylabel("stages loaded from the cache")
        left.set_ylim(0, max(1, len(experiment.stage_names)))
        left.yaxis.set_major_locator(MaxNLocator(integer=True))
        _integer_ticks(left, len(trials))
    else:
        _empty(left, "no trials")
    right.set_title("Cache hits per stage")
    hits = cache_hits_per_stage(experiment)
    if hits:
        names = list(hits)
        right.bar(names, [hits[s] for s in names], color="tab:green")
        right.set_ylabel(f"trials that loaded it (of {len(trials)})")
        right.set_ylim(0, max(1, len(trials)))
        right.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _empty(right, "no per-stage cache hits reported")
    return fig


def _eta(experiment: Experiment) -> Figure | None:
    series, _ = eta_series(experiment)
    if series is None:
        return None
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.set_title(f"Cost-cooling exponent eta ({series.source})")
    ax.step(series.budget_spent, series.eta, where="post", color="tab:purple", alpha=0.6)
    for phase, marker in (("warmup", "o"), ("given", "s"), ("random", "x"), ("bo", "D")):
        points = [
            (c, e)
            for c, e, p in zip(series.budget_spent, series.eta, series.phase, strict=True)
            if p == phase
        ]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, s=20, label=phase, zorder=3)
    if experiment.budget is not None:
        ax.axvline(float(experiment.budget), color="tab:red", linestyle="--", label="budget")
    ax.set_xlabel("cost spent when the config was suggested")
    ax.set_ylabel("eta")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _integer_ticks(ax: Any, n: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(n, 12), integer=True))
    ax.set_xlim(0.4, n + 0.6)
