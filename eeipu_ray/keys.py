"""Deterministic prefix keys.

A *prefix key* names "stages 1..k of pipeline P, at these stage versions, with
these hyperparameters". Every process on every machine computes the same key for
the same prefix, so a trial on one node can find what a trial on another node
stored.

How the key is built:

* each hyperparameter value is turned into a canonical, type-tagged structure:
  floats by their exact hexadecimal form (``float.hex``: no rounding, ``-0.0``
  differs from ``0.0``), ints as decimal strings, dict entries sorted by key, so
  the key is insensitive to dict order and exact for floats;
* the structure is serialized to JSON with sorted keys and no whitespace;
* keys are chained: ``key_k = sha256(key_{k-1} || stage_k)`` where ``stage_k``
  holds the stage's index, name, version and hyperparameters. Bumping a stage's
  version therefore changes its key and every key after it.

Python's ``hash()`` is never used (it is salted per process). A key is 64
lowercase hex characters; :func:`check_key` is applied before a key ever becomes
part of a storage path, so a hyperparameter value can never steer a write
outside the cache root.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from eeipu_ray.errors import PrefixKeyError

#: Bumped only if the canonical encoding changes; part of every key.
KEY_FORMAT = "eeipu-prefix-v1"

_KEY_RE = re.compile(r"[0-9a-f]{64}")


def canonicalize(value: Any, where: str = "value") -> Any:
    """Return a JSON-able, type-tagged canonical form of a hyperparameter value.

    Args:
        value: A hyperparameter value: ``None``, bool, int, float, str, or
            lists/tuples/dicts (string keys) of those; NumPy scalars are
            accepted and treated as the Python scalar they hold.
        where: Names the value in error messages (``"stage 'prep', key 'lr'"``).

    Raises:
        PrefixKeyError: for NaN or for a type without a canonical form.
    """
    # NumPy scalars: converted by duck typing so keys.py does not import NumPy.
    if (
        hasattr(value, "item")
        and type(value).__module__ == "numpy"
        and getattr(value, "ndim", 1) == 0
    ):
        value = value.item()
    if value is None:
        return ["n"]
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return ["b", value]
    if isinstance(value, int):
        # int(): an IntEnum's str() differs between Python versions.
        return ["i", str(int(value))]
    if isinstance(value, float):
        if math.isnan(value):
            raise PrefixKeyError(f"{where} is NaN; a NaN hyperparameter cannot be keyed")
        return ["f", value.hex()]
    if isinstance(value, str):
        return ["s", str(value)]
    if isinstance(value, Mapping):
        items = []
        for k in value:
            if not isinstance(k, str):
                raise PrefixKeyError(
                    f"{where} has a non-string dict key {k!r} ({type(k).__name__}); "
                    "use string keys in hyperparameter dicts"
                )
            items.append([k, canonicalize(value[k], f"{where}/{k}")])
        items.sort(key=lambda kv: kv[0])
        return ["d", items]
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return ["l", [canonicalize(v, f"{where}[{i}]") for i, v in enumerate(value)]]
    raise PrefixKeyError(
        f"{where} = {value!r} has type {type(value).__name__}, which has no canonical "
        "form; use None, bool, int, float, str, or lists/dicts of those"
    )


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def root_key(pipeline_name: str) -> str:
    """The key of the empty prefix of a pipeline (stage 0)."""
    return hashlib.sha256(_dumps([KEY_FORMAT, pipeline_name])).hexdigest()


def chain_key(
    parent_key: str, index: int, stage_name: str, version: str, params: Mapping[str, Any]
) -> str:
    """Extend ``parent_key`` (stages 1..index-1) by stage ``index``.

    Args:
        parent_key: Key of the prefix before this stage (``root_key`` for stage 1).
        index: 1-based position of the stage.
        stage_name: The stage's name.
        version: The stage's version string.
        params: The stage's own hyperparameters.
    """
    check_key(parent_key)
    if not isinstance(params, Mapping):
        raise PrefixKeyError(
            f"stage {stage_name!r}: hyperparameters must be a mapping, got {type(params).__name__}"
        )
    canon = _canonical_params(stage_name, params)
    body = _dumps([parent_key, index, stage_name, version, canon])
    return hashlib.sha256(body).hexdigest()


def _canonical_params(stage_name: str, params: Mapping[str, Any]) -> Any:
    # Same structure as canonicalize(dict(params)); only the error messages
    # differ: they name the stage and the hyperparameter ("stage 'prep', key 'lr'").
    items = []
    for k in params:
        if not isinstance(k, str):
            raise PrefixKeyError(
                f"stage {stage_name!r} has a non-string hyperparameter name {k!r} "
                f"({type(k).__name__})"
            )
        items.append([k, canonicalize(params[k], f"stage {stage_name!r}, key {k!r}")])
    items.sort(key=lambda kv: kv[0])
    return ["d", items]


def check_key(key: str) -> str:
    """Return ``key`` if it is a well-formed prefix key, else raise.

    Called before a key becomes part of any storage path.
    """
    # fullmatch: re.match with "$" would also accept a trailing newline.
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise PrefixKeyError(f"{key!r} is not a prefix key (64 lowercase hex characters)")
    return key
