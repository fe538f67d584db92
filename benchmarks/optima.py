"""True optima of the synthetic layouts, found once by multi-start and recorded.

A layout's objective ``-sum_k w_k f_k(h_k)`` is separable: stage ``k``'s term
depends on its own hyperparameters only, so the optimum is the sum of the
per-stage minima of ``w_k f_k`` over each stage's box. Each minimum is found
by scoring ``2^14`` scrambled Sobol points and polishing the best 64 with
L-BFGS-B (exact gradients through torch); the best polished point wins.

Regret in ``benchmarks/evaluate.py`` is measured against these values
(``results/synthetic_optima.json``; ``python benchmarks/optima.py`` rewrites it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
OPTIMA_FILE = RESULTS / "synthetic_optima.json"


def stage_minimum(stage: Any, n_sobol: int = 2**14, n_polish: int = 64, seed: int = 0) -> tuple[
    float, list[float]
]:
    """``(min, argmin)`` of ``w f(h)`` over the stage's box."""
    from scipy.optimize import minimize

    d = len(stage.keys)
    lo, hi = stage.bounds
    engine = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed)
    X = lo + (hi - lo) * engine.draw(n_sobol, dtype=torch.double)
    with torch.no_grad():
        values = stage.term_scale * stage.term(X)
    starts = X[values.argsort()[:n_polish]]

    def fun(x: Any) -> tuple[float, Any]:
        t = torch.tensor(x, dtype=torch.double, requires_grad=True)
        v = stage.term_scale * stage.term(t)
        v.backward()
        return float(v.detach()), t.grad.numpy().copy()

    best_v, best_x = float(values.min()), X[values.argmin()].tolist()
    for x0 in starts:
        res = minimize(
            fun, x0.numpy(), jac=True, method="L-BFGS-B", bounds=[(lo, hi)] * d,
            options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 1000},
        )
        if math.isfinite(float(res.fun)) and float(res.fun) < best_v:
            best_v, best_x = float(res.fun), [float(v) for v in res.x]
    return best_v, best_x


def layout_optimum(name: str) -> dict[str, Any]:
    """The optimum (maximum of the objective) of layout ``name`` and where it is."""
    from eeipu_ray.pipelines.synthetic import get_layout, synthetic_objective

    layout = get_layout(name)
    config: dict[str, dict[str, float]] = {}
    for stage in layout.stages:
        _, x = stage_minimum(stage)
        config[stage.name] = dict(zip(stage.keys, x, strict=True))
    return {"optimum": synthetic_objective(config, layout), "argmax": config}


def load_optima(path: Path = OPTIMA_FILE) -> dict[str, float]:
    """``{layout: optimum}`` as recorded."""
    data = json.loads(path.read_text())
    return {name: float(entry["optimum"]) for name, entry in data["layouts"].items()}


def main(argv: list[str] | None = None) -> int:
    from eeipu_ray.pipelines.synthetic import LAYOUTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OPTIMA_FILE))
    args = ap.parse_args(argv)
    layouts = {name: layout_optimum(name) for name in LAYOUTS}
    for name, entry in layouts.items():
        print(f"{name:<8} optimum {entry['optimum']:.6f}")
    doc = {"method": __doc__.split("\n\n")[1].replace("\n", " "), "layouts": layouts}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
