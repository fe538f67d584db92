"""One search-space encoder: Ray Tune domains <-> the unit cube ``[0, 1]^d``.

Every searchable hyperparameter becomes one dimension of the cube; constants
are carried through unchanged and take no dimension. The cube spans the
*declared* bounds of each domain, never the range observed so far, so the GP
sees the whole space from the first step.

Per domain (``t`` is the transform applied before scaling to ``[0, 1]``):

=====================  ==============================  ===========================
domain                 values                          cube coordinate
=====================  ==============================  ===========================
``uniform(a, b)``      floats in ``[a, b]``            ``(v - a) / (b - a)``
``loguniform(a, b)``   floats in ``[a, b]``            same on ``log v``
``quniform(a, b, q)``  multiples of ``q`` in ``[a, b]``  grid, padded by ``q / 2``
``qloguniform``        as above, log-distributed       log grid, padded by ``q / 2``
``randint(a, b)``      ints ``a .. b - 1``             grid, padded by ``1 / 2``
``lograndint(a, b)``   ints ``a .. b - 1``             log grid, padded by ``1 / 2``
``qrandint(a, b, q)``  multiples of ``q`` in ``[a, b]``  grid, padded by ``q / 2``
                       (``q = 1``: ``a .. b - 1``)
``qlograndint``        as above                        log grid, padded by ``q / 2``
``choice(cats)``       one of ``cats``                 index ``j`` -> ``(j + 1/2) / n``
=====================  ==============================  ===========================

Padding a grid of ``n`` values by half a step (as Optuna does) gives every value
an equal share ``1 / n`` of a linear dimension, so uniform cube points decode to
uniform values. A zero-width range (one value, or ``uniform(a, a)``) maps to 0.5.
Inclusive/exclusive upper bounds follow what Ray Tune 2.60 itself samples:
``randint``/``lograndint`` and ``q = 1`` exclude ``b``; ``q > 1`` includes it.

Rejected, with a :class:`~eeipu_ray.search.errors.SearchSpaceError` naming the
key as ``"stage/key"``: ``grid_search``, ``sample_from``, ``randn``/``qrandn``
(unbounded), infinite bounds, and nested mappings holding domains (a plain
space nested deeper is flattened first, see :class:`~eeipu_ray.search.paths.PathLayout`).

Example:
    >>> from ray import tune
    >>> space = SearchSpace.from_tune({
    ...     "prep": {"n": tune.randint(1, 10), "seed": 0},
    ...     "train": {"lr": tune.loguniform(1e-4, 1e-1), "opt": tune.choice(["sgd", "adam"])},
    ... })
    >>> space.dim, space.dims_of_stage(1)
    (3, [1, 2])
    >>> config = space.from_unit(space.sample(1, seed=0)[0])
    >>> config["prep"]["seed"], type(config["prep"]["n"]).__name__
    (0, 'int')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from eeipu_ray._domains import is_domain, is_grid_search, mentions_domain
from eeipu_ray.search.errors import SearchSpaceError

DimKind = Literal["float", "int", "categorical"]


@dataclass(frozen=True)
class Dimension:
    """One dimension of the cube.

    Attributes:
        stage: Name of the stage owning the hyperparameter (``""`` for a flat space).
        key: The hyperparameter's name within its stage.
        stage_index: 0-based position of the stage.
        kind: ``"float"``, ``"int"`` or ``"categorical"``.
        log: Whether the value is log-transformed before scaling.
        t_lower: Lower end of the cube in transformed space (padded for grids).
        t_upper: Upper end of the cube in transformed space (padded for grids).
        q: Grid step for grid dimensions (ints, quantized floats), else ``None``.
        k0: Grid index of the smallest value (``value = (k0 + j) * q``).
        n: Number of values of a grid or categorical dimension (0 for continuous).
        categories: The choices of a categorical dimension.
        bounds: The declared ``(lower, upper)`` of a continuous log float: decoded
            values are clamped to them (``exp(log(upper))`` can round above ``upper``).
    """

    stage: str
    key: str
    stage_index: int
    kind: DimKind
    log: bool = False
    t_lower: float = 0.0
    t_upper: float = 1.0
    q: float | None = None
    k0: int = 0
    n: int = 0
    categories: tuple[Any, ...] = ()
    bounds: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        """``"stage/key"``, or ``"key"`` for a flat space."""
        return f"{self.stage}/{self.key}" if self.stage else self.key

    @property
    def is_grid(self) -> bool:
        """True for dimensions whose values form a finite grid (not categorical)."""
        return self.q is not None

    def signature(self) -> str:
        """A string that changes whenever the encoding of this dimension changes."""
        cats = f",cats={self.categories!r}" if self.kind == "categorical" else ""
        return (
            f"{self.name}:{self.kind}:log={self.log}:[{self.t_lower!r},{self.t_upper!r}]"
            f":q={self.q!r}:k0={self.k0}:n={self.n}{cats}"
        )


class SearchSpace:
    """A Ray Tune search space encoded into the unit cube.

    Build it with :meth:`from_tune`. The space is nested per stage
    (``{stage: {key: domain}}``) or flat (``{key: domain}``, one stage); configs
    decoded by :meth:`from_unit` have the same shape as the space.

    Args:
        dims: The cube's dimensions, grouped by stage in stage order.
        stage_names: Stage names in order (``[""]`` for a flat space).
        constants: ``{stage: {key: value}}`` of the non-searchable entries.
        layout: ``{stage: [key, ...]}`` the original key order per stage.
        nested: Whether configs are nested per stage.
    """

    def __init__(
        self,
        dims: Sequence[Dimension],
        stage_names: Sequence[str],
        constants: Mapping[str, Mapping[str, Any]],
        layout: Mapping[str, Sequence[str]],
        nested: bool,
    ) -> None:
        self.dims: tuple[Dimension, ...] = tuple(dims)
        self.stage_names: list[str] = list(stage_names)
        self.nested = nested
        self._constants = {s: dict(constants.get(s, {})) for s in self.stage_names}
        self._layout = {s: list(layout.get(s, [])) for s in self.stage_names}
        self._index = {(d.stage, d.key): i for i, d in enumerate(self.dims)}

    # ------------------------------------------------------------ building
    @classmethod
    def from_tune(
        cls, space: Mapping[str, Any], stage_order: Sequence[str] | None = None
    ) -> SearchSpace:
        """Encode a Ray Tune search space.

        Args:
            space: ``{stage: {key: domain or constant}}`` or a flat
                ``{key: domain or constant}`` (one stage). The space is nested
                when every value is a mapping that is not a ``grid_search``.
            stage_order: Stage names in execution order (e.g.
                ``pipeline.stage_names``); defaults to the space's key order.

        Returns:
            The encoder.

        Raises:
            SearchSpaceError: naming ``"stage/key"`` for an unsupported domain, or
                when ``stage_order`` does not name exactly the space's stages.
        """
        if not isinstance(space, Mapping):
            raise SearchSpaceError(f"search space must be a mapping, got {type(space).__name__}")
        nested = bool(space) and all(
            isinstance(v, Mapping) and not is_grid_search(v) for v in space.values()
        )
        if nested:
            per_stage = {str(s): dict(sub) for s, sub in space.items()}
        else:
            if stage_order is not None and list(stage_order) not in ([], [""]):
                raise SearchSpaceError(
                    f"stage_order {list(stage_order)!r} given for a flat (single-stage) "
                    "space; nest the space per stage ({stage: {key: domain}}) instead"
                )
            per_stage = {"": dict(space)}
        names = list(per_stage)
        if nested and stage_order is not None:
            order = [str(s) for s in stage_order]
            if sorted(order) != sorted(names) or len(set(order)) != len(order):
                raise SearchSpaceError(
                    f"stage_order {order!r} must name each stage of the space exactly once "
                    f"(space stages: {names!r})"
                )
            names = order
        dims: list[Dimension] = []
        constants: dict[str, dict[str, Any]] = {}
        layout: dict[str, list[str]] = {}
        for stage_index, stage in enumerate(names):
            constants[stage] = {}
            layout[stage] = []
            for raw_key, value in per_stage[stage].items():
                key = str(raw_key)
                layout[stage].append(key)
                shown = f"{stage}/{key}" if stage else key
                dim = _make_dimension(stage, key, stage_index, value, shown)
                if dim is None:
                    constants[stage][key] = value
                else:
                    dims.append(dim)
        return cls(dims, names, constants, layout, nested)

    # ---------------------------------------------------------- structure
    @property
    def dim(self) -> int:
        """Number of cube dimensions ``d``."""
        return len(self.dims)

    @property
    def n_stages(self) -> int:
        """Number of stages ``K``."""
        return len(self.stage_names)

    @property
    def stage_of_dim(self) -> Tensor:
        """``LongTensor[d]``: the 0-based stage index owning each dimension."""
        return torch.tensor([d.stage_index for d in self.dims], dtype=torch.long)

    @property
    def is_categorical(self) -> Tensor:
        """``BoolTensor[d]``: which dimensions hold a categorical index."""
        return torch.tensor([d.kind == "categorical" for d in self.dims], dtype=torch.bool)

    @property
    def categorical_dims(self) -> list[int]:
        """Indices of the categorical dimensions."""
        return [i for i, d in enumerate(self.dims) if d.kind == "categorical"]

    def dims_of_stage(self, k: int) -> list[int]:
        """Cube dimensions of stage ``k`` (0-based)."""
        self._check_stage(k)
        return [i for i, d in enumerate(self.dims) if d.stage_index == k]

    def dims_of_prefix(self, depth: int) -> list[int]:
        """Cube dimensions of stages ``0 .. depth - 1`` (the prefix of ``depth`` stages)."""
        if not 0 <= depth <= self.n_stages:
            raise SearchSpaceError(f"prefix depth {depth} outside 0..{self.n_stages}")
        return [i for i, d in enumerate(self.dims) if d.stage_index < depth]

    def signature(self) -> list[str]:
        """Strings identifying the encoding (to check a checkpoint fits this space)."""
        return [f"stages={self.stage_names!r}:nested={self.nested}"] + [
            d.signature() for d in self.dims
        ]

    def __repr__(self) -> str:
        names = [d.name for d in self.dims]
        return f"SearchSpace(dim={self.dim}, stages={self.stage_names}, dims={names})"

    def _check_stage(self, k: int) -> None:
        if not 0 <= k < self.n_stages:
            raise SearchSpaceError(f"stage index {k} outside 0..{self.n_stages - 1}")

    # ----------------------------------------------------------- encoding
    def to_unit(self, config: Mapping[str, Any]) -> Tensor:
        """Encode a config into the cube.

        Args:
            config: Nested ``{stage: {key: value}}`` (flat ``"stage/key"`` entries
                accepted too) or, for a flat space, ``{key: value}``. Entries that
                are not dimensions (constants, extras) are ignored.

        Returns:
            ``Tensor[d]`` (double). Numeric values outside the declared bounds are
            clipped to the cube's faces; grid values snap to their cell's center.

        Raises:
            SearchSpaceError: naming ``"stage/key"`` when a value is missing, not a
                number, or not one of a choice's categories.
        """
        if not isinstance(config, Mapping):
            raise SearchSpaceError(f"config must be a mapping, got {type(config).__name__}")
        x = torch.empty(self.dim, dtype=torch.double)
        for i, dim in enumerate(self.dims):
            x[i] = _encode(dim, self._lookup(config, dim))
        return x

    def from_unit(self, x: Tensor | Sequence[float]) -> dict[str, Any]:
        """Decode a cube point into a config (constants filled in).

        Args:
            x: ``Tensor[d]``; coordinates outside ``[0, 1]`` are clipped.

        Returns:
            ``{stage: {key: value}}`` (or ``{key: value}`` for a flat space) with
            ``int`` for integer domains, the original object for choices and
            ``float`` otherwise, in the space's key order.
        """
        try:
            x = torch.as_tensor(x, dtype=torch.double).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SearchSpaceError(
                f"cube point {x!r:.200} is not a sequence of {self.dim} numbers ({exc})"
            ) from None
        if x.numel() != self.dim:
            raise SearchSpaceError(f"cube point has {x.numel()} coordinates, space has {self.dim}")
        values = {(d.stage, d.key): _decode(d, float(x[i])) for i, d in enumerate(self.dims)}
        out: dict[str, Any] = {}
        for stage in self.stage_names:
            sub: dict[str, Any] = {}
            for key in self._layout[stage]:
                sub[key] = (
                    values[(stage, key)] if (stage, key) in values else self._constants[stage][key]
                )
            out[stage] = sub
        return out if self.nested else out[""]

    def snap(self, X: Tensor) -> Tensor:
        """Map grid and categorical coordinates to the center of their value's cell.

        Two cube points snap to the same point exactly when they decode to the
        same config (continuous coordinates are left as they are).

        Args:
            X: ``batch_shape x d``.

        Returns:
            ``batch_shape x d``, no gradient through snapped coordinates.
        """
        X = X.clone()
        for i, dim in enumerate(self.dims):
            if dim.kind == "categorical" or (dim.is_grid and not dim.log):
                n = max(dim.n, 1)
                j = (X[..., i].detach() * n).floor().clamp(0, n - 1)
                X[..., i] = (j + 0.5) / n
            elif dim.is_grid:  # log grid: decode the index, encode it back
                assert dim.q is not None
                t = dim.t_lower + X[..., i].detach().clamp(0, 1) * (dim.t_upper - dim.t_lower)
                j = (torch.exp(t) / dim.q).round().sub(dim.k0).clamp(0, dim.n - 1)
                X[..., i] = _unit(dim, torch.log((j + dim.k0) * dim.q))
        return X

    # ----------------------------------------------------------- sampling
    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """``n`` independent uniform cube points, ``Tensor[n, d]`` (double)."""
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        return torch.rand(n, self.dim, generator=gen, dtype=torch.double)

    def sobol(self, n: int, seed: int | None = None, skip: int = 0) -> Tensor:
        """Points ``skip .. skip + n - 1`` of a scrambled Sobol sequence, ``Tensor[n, d]``."""
        if self.dim == 0:
            return torch.empty(n, 0, dtype=torch.double)
        engine = torch.quasirandom.SobolEngine(self.dim, scramble=True, seed=seed)
        if skip:
            engine.fast_forward(skip)
        return engine.draw(n, dtype=torch.double)

    # ------------------------------------------------------------ helpers
    def _lookup(self, config: Mapping[str, Any], dim: Dimension) -> Any:
        if not self.nested:
            if dim.key in config:
                return config[dim.key]
        else:
            sub = config.get(dim.stage)
            if isinstance(sub, Mapping) and dim.key in sub:
                return sub[dim.key]
            if dim.name in config:
                return config[dim.name]
        raise SearchSpaceError(f"config lacks hyperparameter {dim.name!r}")


# --------------------------------------------------------------------------
# Private numeric helpers
# --------------------------------------------------------------------------


def _make_dimension(
    stage: str, key: str, stage_index: int, value: Any, shown: str
) -> Dimension | None:
    """The dimension of one space entry, or None for a constant."""
    if is_grid_search(value):
        raise SearchSpaceError(
            f"{shown!r}: grid_search is not supported by a Bayesian optimizer; use "
            "tune.choice(...) for the same values"
        )
    if not is_domain(value):
        if isinstance(value, Mapping) and mentions_domain(value):
            raise SearchSpaceError(
                f"{shown!r}: nested mappings of domains are not supported; give each "
                "stage a flat {key: domain} mapping"
            )
        return None  # a constant

    from ray.tune.search import sample as rs

    if isinstance(value, rs.Function):
        raise SearchSpaceError(
            f"{shown!r}: sample_from cannot be encoded for Bayesian optimization; use a "
            "bounded domain (uniform, randint, choice, ...)"
        )
    sampler = value.get_sampler()
    if isinstance(value, rs.Categorical):
        cats = tuple(value.categories)
        if not cats:
            raise SearchSpaceError(f"{shown!r}: choice() needs at least one category")
        return Dimension(stage, key, stage_index, "categorical", n=len(cats), categories=cats)
    if not isinstance(value, rs.Float | rs.Integer):
        raise SearchSpaceError(f"{shown!r}: unsupported domain {type(value).__name__}")

    return _numeric_dimension(stage, key, stage_index, value, sampler, shown)


def _numeric_dimension(
    stage: str, key: str, stage_index: int, value: Any, sampler: Any, shown: str
) -> Dimension:
    """The dimension of a bounded float or integer domain (continuous or a grid)."""
    from ray.tune.search import sample as rs

    q: float | None = None
    base = sampler
    if isinstance(sampler, rs.Quantized):
        q, base = sampler.q, sampler.sampler
    if isinstance(base, rs.Normal):
        raise SearchSpaceError(
            f"{shown!r}: randn/qrandn are unbounded and cannot be mapped to the unit "
            "cube; use uniform/quniform with explicit bounds"
        )
    if not isinstance(base, rs.Uniform | rs.LogUniform):
        raise SearchSpaceError(f"{shown!r}: unsupported sampler {type(base).__name__}")
    log = isinstance(base, rs.LogUniform)
    lower, upper = float(value.lower), float(value.upper)
    if not (math.isfinite(lower) and math.isfinite(upper)) or upper < lower:
        raise SearchSpaceError(
            f"{shown!r}: bounds [{lower}, {upper}] must be finite with lower <= upper"
        )
    if not math.isfinite(upper - lower):
        raise SearchSpaceError(
            f"{shown!r}: bounds [{lower}, {upper}] are too far apart for a float "
            "(their difference overflows); narrow them"
        )
    if log and lower <= 0:
        raise SearchSpaceError(f"{shown!r}: log domains need a lower bound > 0, got {lower}")
    is_int = isinstance(value, rs.Integer)
    kind: DimKind = "int" if is_int else "float"

    if q is None and not is_int:  # continuous float
        t_lo, t_hi = (math.log(lower), math.log(upper)) if log else (lower, upper)
        return Dimension(
            stage,
            key,
            stage_index,
            kind,
            log=log,
            t_lower=t_lo,
            t_upper=t_hi,
            bounds=(lower, upper) if log else None,
        )

    return _grid_dimension(stage, key, stage_index, kind, q, lower, upper, log=log, shown=shown)


def _grid_dimension(
    stage: str,
    key: str,
    stage_index: int,
    kind: DimKind,
    q: float | None,
    lower: float,
    upper: float,
    *,
    log: bool,
    shown: str,
) -> Dimension:
    """A grid of values ``(k0 + j) * step``, ``j = 0 .. n - 1``, as Ray samples them."""
    is_int = kind == "int"
    step = float(q) if q is not None else 1.0
    if step <= 0:
        raise SearchSpaceError(f"{shown!r}: quantization q={q} must be > 0")
    if is_int and (q is None or step == 1):  # randint, lograndint, q = 1: upper exclusive
        k0, k1 = math.ceil(lower), math.ceil(upper) - 1
        if upper == lower:  # randint(a, a): read as the single value a
            k1 = k0
        step = 1.0
    else:
        k0, k1 = _grid_index(lower, step, math.ceil), _grid_index(upper, step, math.floor)
    if k1 < k0:
        raise SearchSpaceError(
            f"{shown!r}: no value of step {step} between {lower} and {upper}; widen the bounds"
        )
    n = k1 - k0 + 1
    if is_int:
        step = int(step) if float(step).is_integer() else step
    # Pad half a step each side so every grid value owns an equal share of the cube.
    lo_edge, hi_edge = (k0 - 0.5) * step, (k1 + 0.5) * step
    if log:
        if lo_edge <= 0:  # only when k0 = 0, impossible for a positive lower bound
            raise SearchSpaceError(f"{shown!r}: log grid reaches 0; raise the lower bound")
        t_lo, t_hi = math.log(lo_edge), math.log(hi_edge)
    else:
        t_lo, t_hi = lo_edge, hi_edge
    return Dimension(
        stage, key, stage_index, kind, log=log, t_lower=t_lo, t_upper=t_hi, q=step, k0=k0, n=n
    )


def _grid_index(bound: float, step: float, round_fn: Any) -> int:
    # Same rule as ray.tune.search.sample.Quantized._grid_index: snap a bound that
    # is (numerically) on the grid, else round inwards.
    scaled = bound / step
    nearest = round(scaled)
    if math.isclose(scaled, nearest):
        return int(nearest)
    return int(round_fn(scaled))


def _unit(dim: Dimension, t: Tensor | float) -> Any:
    """Scale a transformed value into ``[0, 1]`` (zero width -> 0.5)."""
    width = dim.t_upper - dim.t_lower
    if width <= 0:
        return t * 0 + 0.5
    return (t - dim.t_lower) / width


def _encode(dim: Dimension, value: Any) -> float:
    """Cube coordinate of one value."""
    if dim.kind == "categorical":
        return (_category_index(dim, value) + 0.5) / dim.n
    if isinstance(value, bool | str | bytes):  # float() would take "1", b"1" and True
        raise SearchSpaceError(
            f"{dim.name!r}: value {value!r} is a {type(value).__name__}, not a number"
        )
    try:
        value = float(value)  # also numpy scalars, 0-d tensors
    except OverflowError:  # an int beyond the float range
        raise SearchSpaceError(
            f"{dim.name!r}: value {value!r:.60} is too large for a float"
        ) from None
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of > 1 element
        raise SearchSpaceError(f"{dim.name!r}: value {value!r:.200} is not a number") from None
    if not math.isfinite(value):
        raise SearchSpaceError(f"{dim.name!r}: value {value!r} is not finite")
    if dim.is_grid:
        assert dim.q is not None
        j = min(max(round(value / dim.q) - dim.k0, 0), dim.n - 1)
        value = (dim.k0 + j) * dim.q
        if not dim.log:
            return (j + 0.5) / dim.n
    if dim.log:
        if value <= 0:
            raise SearchSpaceError(f"{dim.name!r}: value {value!r} must be > 0 (log domain)")
        value = math.log(value)
    return min(max(float(_unit(dim, value)), 0.0), 1.0)


def _decode(dim: Dimension, u: float) -> Any:
    """Value of one cube coordinate, with the domain's Python type."""
    u = min(max(u, 0.0), 1.0) if math.isfinite(u) else 0.5
    if dim.kind == "categorical":
        return dim.categories[min(int(u * dim.n), dim.n - 1)]
    if dim.is_grid:
        assert dim.q is not None
        if dim.log:
            t = dim.t_lower + u * (dim.t_upper - dim.t_lower)
            j = min(max(round(math.exp(t) / dim.q) - dim.k0, 0), dim.n - 1)
        else:
            j = min(int(u * dim.n), dim.n - 1)
        # Same arithmetic as Ray (index * q), so values match Ray's own samples.
        value = (dim.k0 + j) * dim.q
        return round(value) if dim.kind == "int" else float(value)
    t = dim.t_lower + u * (dim.t_upper - dim.t_lower)
    if dim.log:
        lo, hi = dim.bounds or (math.exp(dim.t_lower), math.exp(dim.t_upper))
        return float(min(max(math.exp(t), lo), hi))
    return float(min(max(t, dim.t_lower), dim.t_upper))


def _category_index(dim: Dimension, value: Any) -> int:
    for j, cat in enumerate(dim.categories):  # identity first: unhashable/odd __eq__
        if cat is value:
            return j
    for j, cat in enumerate(dim.categories):
        if type(cat) is type(value) and _equal(cat, value):
            return j
    for j, cat in enumerate(dim.categories):
        if _equal(cat, value):
            return j
    raise SearchSpaceError(
        f"{dim.name!r}: value {value!r} is not one of the choices {list(dim.categories)!r}"
    )


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. numpy arrays: ambiguous truth value
        return False
