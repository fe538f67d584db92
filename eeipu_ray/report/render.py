"""``report.md`` and ``report.html`` of an experiment.

The Markdown references the PNGs next to it; the HTML embeds them (base64), so
it is one self-contained file. The HTML's inline script sets
``data-images-loaded`` / ``data-images-total`` on ``<body>`` once the page has
loaded, which lets a headless browser check that every plot decoded.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eeipu_ray.report.experiment import Experiment, TrialRow, load_experiment
from eeipu_ray.report.plots import draw_all
from eeipu_ray.report.series import eta_series

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"

_TITLES = {
    "best_objective": "Best objective versus cost spent",
    "stage_costs": "Per-stage cost per trial",
    "cache_hits": "Cache hits",
    "eta": "Cost-cooling exponent eta",
}
_CAPTIONS = {
    "best_objective": "Best objective so far after each finished trial, against the "
    "cumulative charged cost; diamonds are trials that started from a cached prefix.",
    "stage_costs": "Solid: stages computed by the trial (their cost). Hatched: stages loaded "
    "from the prefix cache, drawn at the compute cost that loading saved. Black tick: what "
    "the trial was charged.",
    "cache_hits": "Left: leading stages each trial loaded from the cache. Right: per stage, "
    "how many trials loaded it.",
}


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    markdown: Path
    html: Path
    images: dict[str, Path]


def write_report(
    experiment: Experiment | str | Path,
    out_dir: str | Path | None = None,
    **load_options: Any,
) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and the PNG plots of an experiment.

    Args:
        experiment: An :class:`Experiment`, or its directory (read with
            :func:`~eeipu_ray.report.load_experiment`).
        out_dir: Where to write (default: the experiment directory).
        **load_options: Passed to ``load_experiment`` (``metric``, ``mode``,
            ``budget``, ``n_warmup``) when ``experiment`` is a path.

    Raises:
        ExperimentDirError: the directory is not an experiment directory.
        ReportError: matplotlib is missing.

    Example:
        >>> files = write_report("results/regression-20250101-120000")
        >>> files.html
        PosixPath('results/regression-20250101-120000/report.html')
    """
    if not isinstance(experiment, Experiment):
        experiment = load_experiment(experiment, **load_options)
    out = Path(out_dir) if out_dir is not None else experiment.path
    images = draw_all(experiment, out)
    _, eta_note = eta_series(experiment)
    markdown = out / MARKDOWN_FILE
    markdown.write_text(_markdown(experiment, images, eta_note))
    page = out / HTML_FILE
    page.write_text(_html(experiment, images, eta_note))
    return ReportFiles(markdown=markdown, html=page, images=images)


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def _facts(experiment: Experiment) -> list[tuple[str, str]]:
    trials = experiment.trials
    failed = len(trials) - len(experiment.completed)
    facts = [
        ("Experiment", str(experiment.path)),
        ("Pipeline", experiment.pipeline or "-"),
        ("Searcher", experiment.searcher or "-"),
        ("Objective", f"{experiment.metric} ({experiment.mode})"),
        ("Trials", f"{len(trials)} ({failed} failed)"),
        (
            "Started from a cached prefix",
            str(sum(1 for t in trials if t.memoized_stages > 0)),
        ),
        ("Cost spent", _fmt(experiment.cost_spent)),
        ("Cost without memoization", _fmt(experiment.cost_without_memoization)),
        ("Budget", _fmt(experiment.budget)),
        ("Energy spent", _energy_fact(experiment)),
    ]
    cpu = [t.cpu_seconds for t in trials if t.cpu_seconds is not None]
    if cpu:
        facts.append(("Process CPU time (CPU-seconds)", _fmt(math.fsum(cpu))))
    best = experiment.best()
    if best is not None:
        facts.append(("Best", f"{_fmt(best.objective)} (trial {best.trial_id})"))
        facts.append(("Best config", json.dumps(best.config, default=str, sort_keys=True)))
    return facts


def _energy_fact(experiment: Experiment) -> str:
    if not experiment.energy_measured:
        return "not measured (no energy meter where the trials ran)"
    spent = experiment.energy_spent
    if spent is None:
        return "measured for some trials only (see the table)"
    return f"{_fmt(spent)} J (measured)"


def _varying(trials: Sequence[TrialRow]) -> tuple[list[str], dict[str, Any]]:
    """Flat config keys that differ between trials, and the constant ones."""
    flat = [_flatten(t.config) for t in trials]
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    varying, constant = [], {}
    for k in keys:
        values = {json.dumps(f.get(k), default=str, sort_keys=True) for f in flat}
        if len(values) > 1 or len(trials) == 1:
            varying.append(k)
        else:
            constant[k] = flat[0].get(k)
    return varying, constant


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in config.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        out.update(_flatten(v, path) if isinstance(v, dict) else {path: v})
    return out


def _config_cell(trial: TrialRow, keys: Sequence[str]) -> str:
    flat = _flatten(trial.config)
    parts = []
    for k in keys:
        v = flat.get(k)
        parts.append(f"{k}={_fmt(v) if isinstance(v, float) else v}")
    return ", ".join(parts)


def _table(experiment: Experiment) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    """Header and rows of the trials table, and the config keys held constant."""
    varying, constant = _varying(experiment.trials)
    header = [
        "#",
        "trial",
        experiment.metric,
        "memoized stages",
        "charged cost",
        *(f"{s} cost" for s in experiment.stage_names),
    ]
    energy = experiment.energy_measured
    if energy:
        header += ["energy J", *(f"{s} energy J" for s in experiment.stage_names)]
    header.append("config")
    rows = []
    for i, t in enumerate(experiment.trials, start=1):
        stage_cells = []
        for s in experiment.stage_names:
            cell = _fmt(t.stage_costs.get(s))
            if t.cache_hit.get(s):
                cell += " (cached)"
            stage_cells.append(cell)
        objective = _fmt(t.objective) if t.completed else f"failed: {t.error}"
        # Energy next to time; "-" where no meter measured it (never 0).
        energy_cells = (
            [_fmt(t.energy_joules), *(_fmt(t.stage_energy.get(s)) for s in experiment.stage_names)]
            if energy
            else []
        )
        rows.append(
            [
                str(i),
                t.trial_id or "-",
                objective,
                str(t.memoized_stages),
                _fmt(t.charged_cost),
                *stage_cells,
                *energy_cells,
                _config_cell(t, varying),
            ]
        )
    return header, rows, constant


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(experiment: Experiment, images: dict[str, Path], eta_note: str) -> str:
    lines = [f"# eeipu-ray report: {experiment.name}", ""]
    for label, value in _facts(experiment):
        lines.append(f"- **{label}:** {_md_cell(value)}")
    lines.append("")
    for key, title in _TITLES.items():
        lines += [f"## {title}", ""]
        if key in images:
            lines += [f"![{title}]({images[key].name})", ""]
        caption = eta_note if key == "eta" else _CAPTIONS[key]
        lines += [caption, ""]
    header, rows, constant = _table(experiment)
    lines += ["## Trials", ""]
    if constant:
        pairs = ", ".join(f"{k}={v}" for k, v in constant.items())
        lines += [f"Same in every trial: {_md_cell(pairs)}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    lines.append("")
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }
#trials-table tr:nth-child(even) td { background: #f6f6f6; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table.facts th { background: none; border: none; width: 16em; vertical-align: top; }
table.facts td { border: none; background: none; font-size: 1.1em; }
"""

# Tells a headless browser (and a reader's devtools) whether every plot decoded.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-loaded", String(loaded));
});
"""


def _html(experiment: Experiment, images: dict[str, Path], eta_note: str) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>eeipu-ray report: {esc(experiment.name)}</title>",
        f"<style>{_STYLE}</style>",
        f"<script>{_SCRIPT}</script>",
        "</head><body>",
        f"<h1>eeipu-ray report: {esc(experiment.name)}</h1>",
        '<table class="facts">',
    ]
    for label, value in _facts(experiment):
        parts.append(f"<tr><th>{esc(label)}</th><td>{esc(value)}</td></tr>")
    parts.append("</table>")
    for key, title in _TITLES.items():
        parts.append(f'<h2 id="{key}">{esc(title)}</h2>')
        if key in images:
            data = base64.b64encode(images[key].read_bytes()).decode("ascii")
            parts.append(
                f'<img id="plot-{key}" alt="{esc(title)}" src="data:image/png;base64,{data}">'
            )
        caption = eta_note if key == "eta" else _CAPTIONS[key]
        parts.append(f"<p>{esc(caption)}</p>")
    header, rows, constant = _table(experiment)
    parts.append('<h2 id="trials">Trials</h2>')
    if constant:
        pairs = ", ".join(f"{k}={v}" for k, v in constant.items())
        parts.append(f"<p>Same in every trial: {esc(pairs)}</p>")
    parts.append('<table id="trials-table"><thead><tr>')
    parts.extend(f"<th>{esc(h)}</th>" for h in header)
    parts.append("</tr></thead><tbody>")
    for row, trial in zip(rows, experiment.trials, strict=True):
        parts.append(f'<tr class="trial" data-trial-id="{esc(trial.trial_id or "")}">')
        parts.extend(f"<td>{esc(c)}</td>" for c in row)
        parts.append("</tr>")
    parts += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(parts)
