"""A real three-stage stacking ensemble (scikit-learn), CPU only.

1. ``data``: a synthetic multi-class problem (``make_classification``: clustered
   classes, redundant features, label noise), split into train and validation
   sets; feature scaling (``standard``, ``quantile`` or ``none``) and univariate
   feature selection (``n_features_kept`` by ANOVA F-score), both fit on the
   train split only.
2. ``base``: four base learners (random forest, histogram gradient boosting,
   logistic regression, k nearest neighbours). Each one's out-of-fold class
   probabilities on the train split come from ``cross_val_predict`` (the meta
   learner must never see a base learner's predictions on rows it was fit on);
   its validation probabilities come from a fit on the whole train split. This
   is the expensive stage, and the one worth memoizing: a few seconds on one
   CPU core at the default size.
3. ``meta``: a logistic regression (regularization ``C``) on the base learners'
   probabilities (or their logarithms), optionally with the original features
   passed through. Reports the validation accuracy as ``score``, the one-vs-rest
   ROC AUC as ``auc`` and the best single base learner's accuracy as
   ``best_base_accuracy`` (what stacking has to beat).

Every stage output is a dict of NumPy arrays, which the prefix cache stores
natively. All randomness is seeded, so a config always gives the same score.
The forest and kNN run with ``n_jobs=1`` (under Ray Tune a trial gets one CPU
unless told otherwise, and parallelism belongs to the sweep); gradient boosting
uses as many OpenMP threads as ``OMP_NUM_THREADS`` allows, which Ray sets to
the trial's CPU count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# scikit-learn is imported here, not in the stages: loading this module is what
# makes the pipeline, and a stage's measured cost should not include imports.
from sklearn.datasets import make_classification
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import QuantileTransformer, StandardScaler

from eeipu_ray.pipeline import Pipeline, Stage, StageContext

#: Base learners in the order their probability columns appear in ``P_train``/``P_val``.
BASE_LEARNERS = ("forest", "boosting", "logistic", "knn")

# Each class is a mixture of this many Gaussian clusters (harder than one blob).
_CLUSTERS_PER_CLASS = 3
# Probabilities are clipped away from 0 before taking logarithms.
_LOG_FLOOR = 1e-4


def _data(_: None, p: dict[str, Any]) -> dict[str, np.ndarray]:
    n_features = p["n_features"]
    X, y = make_classification(
        n_samples=p["n_samples"],
        n_features=n_features,
        n_informative=n_features // 2,
        n_redundant=n_features // 4,
        n_classes=p["n_classes"],
        n_clusters_per_class=_CLUSTERS_PER_CLASS,
        class_sep=0.8,
        flip_y=0.03,
        random_state=p["seed"],
    )
    X_train, X_val, y_train, y_val = train_test_split(
        X, y, test_size=0.25, stratify=y, random_state=p["seed"]
    )
    if p["scaling"] == "standard":
        scaler: Any = StandardScaler()
    elif p["scaling"] == "quantile":
        scaler = QuantileTransformer(
            output_distribution="normal",
            n_quantiles=min(1000, len(X_train)),
            random_state=p["seed"],
        )
    elif p["scaling"] == "none":
        scaler = None
    else:
        raise ValueError(f"scaling must be 'standard', 'quantile' or 'none', got {p['scaling']!r}")
    if scaler is not None:
        X_train, X_val = scaler.fit_transform(X_train), scaler.transform(X_val)
    selector = SelectKBest(f_classif, k=min(p["n_features_kept"], n_features))
    X_train, X_val = selector.fit_transform(X_train, y_train), selector.transform(X_val)
    return {
        "X_train": X_train.astype(np.float32),
        "y_train": y_train.astype(np.int64),
        "X_val": X_val.astype(np.float32),
        "y_val": y_val.astype(np.int64),
    }


def _base_learners(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "forest": RandomForestClassifier(
            n_estimators=p["forest_trees"],
            min_samples_leaf=p["forest_min_leaf"],
            n_jobs=1,
            random_state=p["seed"],
        ),
        "boosting": HistGradientBoostingClassifier(
            learning_rate=p["boosting_lr"],
            max_iter=p["boosting_iters"],
            max_leaf_nodes=15,
            early_stopping=False,  # boosting_iters alone sets how much work is done
            random_state=p["seed"],
        ),
        "logistic": LogisticRegression(C=p["logistic_C"], max_iter=2000),
        "knn": KNeighborsClassifier(n_neighbors=p["knn_k"], n_jobs=1),
    }


def _base(data: dict[str, np.ndarray], p: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    X_train, y_train = data["X_train"], data["y_train"]
    X_val, y_val = data["X_val"], data["y_val"]
    folds = StratifiedKFold(n_splits=p["folds"], shuffle=True, random_state=p["seed"])
    P_train, P_val, base_accuracy = [], [], []
    for name, learner in _base_learners(p).items():
        P_train.append(
            cross_val_predict(learner, X_train, y_train, cv=folds, method="predict_proba")
        )
        proba_val = learner.fit(X_train, y_train).predict_proba(X_val)
        P_val.append(proba_val)
        accuracy = float(np.mean(learner.classes_[proba_val.argmax(axis=1)] == y_val))
        base_accuracy.append(accuracy)
        ctx.report(learner=name, val_accuracy=accuracy)
    return {
        "P_train": np.hstack(P_train).astype(np.float32),
        "P_val": np.hstack(P_val).astype(np.float32),
        "X_train": X_train,
        "y_train": y_train,
        "X_val": X_val,
        "y_val": y_val,
        "base_accuracy": np.asarray(base_accuracy),
    }


def _meta(base: dict[str, np.ndarray], p: dict[str, Any]) -> dict[str, float]:
    def features(P: np.ndarray, X: np.ndarray) -> np.ndarray:
        if p["meta_input"] == "log_proba":
            P = np.log(np.clip(P, _LOG_FLOOR, 1.0))
        elif p["meta_input"] != "proba":
            raise ValueError(f"meta_input must be 'proba' or 'log_proba', got {p['meta_input']!r}")
        return np.hstack([P, X]) if p["passthrough"] else P

    meta = LogisticRegression(C=p["C"], max_iter=2000)
    meta.fit(features(base["P_train"], base["X_train"]), base["y_train"])
    proba = meta.predict_proba(features(base["P_val"], base["X_val"]))
    y_val = base["y_val"]
    accuracy = float(np.mean(meta.classes_[proba.argmax(axis=1)] == y_val))
    if proba.shape[1] == 2:
        auc = roc_auc_score(y_val, proba[:, 1])
    else:
        auc = roc_auc_score(y_val, proba, multi_class="ovr", labels=meta.classes_)
    return {
        "score": accuracy,
        "auc": float(auc),
        "best_base_accuracy": float(base["base_accuracy"].max()),
    }


def build_pipeline(
    n_samples: int = 3000,
    n_features: int = 20,
    n_classes: int = 3,
    folds: int = 5,
    max_trees: int = 100,
) -> Pipeline:
    """The stacking pipeline.

    Args:
        n_samples: Rows generated (a quarter of them is the validation split).
        n_features: Features generated; ``n_features_kept`` chooses among
            ``n_features // 4``, ``n_features // 2`` and ``n_features``.
        n_classes: Number of classes.
        folds: Cross-validation folds for the out-of-fold predictions.
        max_trees: Largest forest (and boosting round count) in the space; the
            space offers it and half of it.

    At the defaults the ``base`` stage takes about 3-9 s on one CPU core
    (mostly the forest and the boosting, in proportion to ``forest_trees`` and
    ``boosting_iters``); the other stages take well under a second. Tests pass
    small values.
    """
    from ray import tune

    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    # make_classification places the class clusters on the corners of a
    # hypercube spanned by the n_features // 2 informative features.
    if n_classes * _CLUSTERS_PER_CLASS > 2 ** (n_features // 2):
        raise ValueError(
            f"n_features={n_features} is too few for {n_classes} classes; give at least "
            f"{2 * math.ceil(math.log2(n_classes * _CLUSTERS_PER_CLASS))}"
        )
    if max_trees < 2:
        raise ValueError(f"max_trees must be >= 2, got {max_trees}")
    kept = sorted({n_features // 4, n_features // 2, n_features})
    trees = [max_trees // 2, max_trees]
    return Pipeline(
        "stacking",
        [
            Stage(
                "data",
                _data,
                {
                    "scaling": tune.choice(["standard", "quantile", "none"]),
                    "n_features_kept": tune.choice(kept),
                    "n_samples": n_samples,
                    "n_features": n_features,
                    "n_classes": n_classes,
                    "seed": 0,
                },
            ),
            Stage(
                "base",
                _base,
                {
                    "forest_trees": tune.choice(trees),
                    "forest_min_leaf": tune.choice([1, 5]),
                    "boosting_lr": tune.loguniform(0.03, 0.3),
                    "boosting_iters": tune.choice(trees),
                    "logistic_C": tune.loguniform(1e-2, 1e1),
                    "knn_k": tune.randint(5, 51),
                    "folds": folds,
                    "seed": 0,
                },
            ),
            Stage(
                "meta",
                _meta,
                {
                    "C": tune.loguniform(1e-3, 1e2),
                    "meta_input": tune.choice(["proba", "log_proba"]),
                    "passthrough": tune.choice([False, True]),
                },
            ),
        ],
    )
