"""Nested Tune search spaces as flat ``"a/b/c"`` keys, and back."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from eeipu_ray.search.errors import SearchSpaceError

Path = tuple[str, ...]

_MISSING = object()


class PathLayout:
    """Where every entry of a nested search space lives.

    Ray Tune users nest their spaces (``{"model": {"lr": loguniform(...)}}``); the
    encoder works on one flat mapping. A layout flattens the space to
    ``{"model/lr": domain}`` (the key is the path joined with ``"/"``, as Tune
    flattens results) and turns a flat config back into the nested shape, with
    constants in place and the space's key order. Leaves are domains,
    constants, empty mappings and ``grid_search`` dicts (the encoder refuses
    the latter, naming the key).

    The paths are kept as tuples, so a flat space whose keys contain ``"/"``
    round-trips unchanged; two paths that join to the same key are refused.

    Example:
        >>> layout = PathLayout.of({"model": {"lr": 0.1, "depth": {"n": 2}}, "bs": 8})
        >>> layout.flat_space
        {'model/lr': 0.1, 'model/depth/n': 2, 'bs': 8}
        >>> layout.nest({"model/lr": 0.2, "model/depth/n": 3, "bs": 8})
        {'model': {'lr': 0.2, 'depth': {'n': 3}}, 'bs': 8}
    """

    def __init__(self, paths: Mapping[str, Path], flat_space: Mapping[str, Any]) -> None:
        self.paths: dict[str, Path] = dict(paths)
        self.flat_space: dict[str, Any] = dict(flat_space)

    @classmethod
    def of(cls, space: Mapping[str, Any]) -> PathLayout:
        """The layout of ``space`` (a mapping, nested to any depth).

        Raises:
            SearchSpaceError: ``space`` is no mapping, a key is not a non-empty
                string (naming its path), or two paths join to the same key.
        """
        if not isinstance(space, Mapping):
            raise SearchSpaceError(f"search space must be a mapping, got {type(space).__name__}")
        paths: dict[str, Path] = {}
        flat: dict[str, Any] = {}
        for path, value in _leaves(space, ()):
            key = "/".join(path)
            if key in paths:
                raise SearchSpaceError(
                    f"search space keys {_show(paths[key])} and {_show(path)} both flatten to "
                    f"{key!r}; rename one"
                )
            paths[key] = path
            flat[key] = value
        return cls(paths, flat)

    @property
    def is_flat(self) -> bool:
        """Whether every entry sits at the top level (nothing to nest)."""
        return all(len(p) == 1 for p in self.paths.values())

    def flatten(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` (nested like the space, or Tune's flat ``"a/b"`` form, or a
        mix) as ``{flat key: value}``; entries the space lacks are dropped and
        entries ``config`` lacks are left out (the encoder names them)."""
        if not isinstance(config, Mapping):
            raise SearchSpaceError(f"config must be a mapping, got {type(config).__name__}")
        out: dict[str, Any] = {}
        for key, path in self.paths.items():
            value = _get(config, path)
            if value is _MISSING and key in config:
                value = config[key]
            if value is not _MISSING:
                out[key] = value
        return out

    def nest(self, flat_config: Mapping[str, Any]) -> dict[str, Any]:
        """A flat config (``{flat key: value}``) in the space's nested shape."""
        out: dict[str, Any] = {}
        for key, path in self.paths.items():
            if key not in flat_config:
                continue
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = copy.deepcopy(flat_config[key])
        return out


def _leaves(node: Mapping[str, Any], prefix: Path) -> list[tuple[Path, Any]]:
    leaves: list[tuple[Path, Any]] = []
    for key, value in node.items():
        if not isinstance(key, str) or not key:
            raise SearchSpaceError(
                f"search space key {key!r} under {_show(prefix) or 'the top level'} must be a "
                "non-empty string"
            )
        path = (*prefix, key)
        if isinstance(value, Mapping) and value and set(value) != {"grid_search"}:
            leaves.extend(_leaves(value, path))
        else:
            leaves.append((path, value))
    return leaves


def _get(config: Mapping[str, Any], path: Path) -> Any:
    node: Any = config
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _show(path: Path) -> str:
    return repr("/".join(path)) if len(path) == 1 else " -> ".join(repr(p) for p in path)
