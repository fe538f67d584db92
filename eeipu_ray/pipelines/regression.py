"""A small, real three-stage regression pipeline (NumPy only), used by the
quick-start sweep and the tests.

1. ``data``: synthesize a nonlinear regression problem (noise level, size),
   split into train and validation sets.
2. ``features``: random Fourier features approximating an RBF kernel
   (number of components, kernel width), standardized. This is the expensive
   stage, and the one worth memoizing.
3. ``ridge``: closed-form ridge regression (regularization strength);
   reports the validation R^2 as ``score``.

Stages 1 and 2 draw from small categorical spaces so that a sweep revisits
prefixes often and the cache has something to do even under random search.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eeipu_ray.pipeline import Pipeline, Stage, StageContext


def _data(_: None, p: dict[str, Any]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(p["seed"])
    n, d = p["n_samples"], p["n_inputs"]
    X = rng.uniform(-2.0, 2.0, size=(n, d)).astype(np.float32)
    w = rng.normal(size=d) / np.sqrt(d)
    y = np.sin(1.5 * X @ w) + 0.5 * np.cos(X[:, 0] * X[:, 1]) + p["noise"] * rng.normal(size=n)
    n_train = int(0.8 * n)
    return {"X_train": X[:n_train], "y_train": y[:n_train].astype(np.float32),
            "X_val": X[n_train:], "y_val": y[n_train:].astype(np.float32)}


def _features(data: dict[str, np.ndarray], p: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    rng = np.random.default_rng(p["seed"])
    d = data["X_train"].shape[1]
    W = rng.normal(scale=1.0 / p["width"], size=(d, p["n_components"])).astype(np.float32)
    b = rng.uniform(0.0, 2.0 * np.pi, size=p["n_components"]).astype(np.float32)

    def phi(X: np.ndarray) -> np.ndarray:
        return np.cos(X @ W + b) * np.float32(np.sqrt(2.0 / p["n_components"]))

    F_train, F_val = phi(data["X_train"]), phi(data["X_val"])
    mu, sd = F_train.mean(axis=0), F_train.std(axis=0) + 1e-6
    ctx.report(features=p["n_components"])
    return {"F_train": (F_train - mu) / sd, "F_val": (F_val - mu) / sd,
            "y_train": data["y_train"], "y_val": data["y_val"]}


def _ridge(feats: dict[str, np.ndarray], p: dict[str, Any]) -> dict[str, float]:
    F, y = feats["F_train"].astype(np.float64), feats["y_train"].astype(np.float64)
    gram = F.T @ F + p["alpha"] * len(y) * np.eye(F.shape[1])
    coef = np.linalg.solve(gram, F.T @ (y - y.mean()))
    pred = feats["F_val"] @ coef + y.mean()
    resid = feats["y_val"] - pred
    r2 = 1.0 - float(resid @ resid) / float(((feats["y_val"] - feats["y_val"].mean()) ** 2).sum())
    return {"score": r2}


def build_pipeline(n_samples: int = 20000, n_inputs: int = 8) -> Pipeline:
    from ray import tune

    return Pipeline("regression", [
        Stage("data", _data, {
            "noise": tune.choice([0.1, 0.3]),
            "n_samples": n_samples, "n_inputs": n_inputs, "seed": 0,
        }),
        Stage("features", _features, {
            "n_components": tune.choice([256, 768]),
            "width": tune.choice([1.0, 3.0]),
            "seed": 0,
        }),
        Stage("ridge", _ridge, {"alpha": tune.loguniform(1e-5, 1.0)}),
    ])
