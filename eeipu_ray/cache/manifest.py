"""The manifest: the small JSON document that makes a cache entry visible.

An entry is published by writing its data first and its manifest last, so a
reader either sees no manifest (no entry) or a manifest whose files were all
written. The manifest carries a checksum (xxh3-128) and size per file; readers
verify both before a single byte reaches a codec.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from eeipu_ray.cache.codecs import PartData, check_part_name, iter_blobs
from eeipu_ray.errors import CacheIntegrityError, CodecError
from eeipu_ray.keys import chain_key, check_key, root_key

MANIFEST_FORMAT = 1

#: Data directory names: ``d-<token>``, one path component (never ``..`` or ``/``).
_DATA_DIR_RE = re.compile(r"^d-[A-Za-z0-9_-]{1,64}$")
_HEX_DIGEST_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    xxh3_128: str


@dataclass(frozen=True)
class EntryMeta:
    """What the writer knows about the prefix it stores.

    Attributes:
        pipeline: Pipeline name.
        stage_names: Names of stages 1..k.
        stage_versions: Versions of stages 1..k.
        params: Hyperparameters of stages 1..k, one dict per stage.
        compute_seconds: Original compute cost of stages 1..k (seconds, or the
            declared cost unit), as first measured: a later trial that loads the
            entry still learns what computing it really costs.
        trial_id: The producing trial, when known.
        compute_energy_joules: Original compute energy of stages 1..k in joules,
            ``None`` per stage where no meter measured it; ``None`` in entries
            written before energy was recorded (they still load).
        energy_sources: Per stage, the meter behind ``compute_energy_joules``
            (``"nvml"``, ``"rapl"``, ``"none"``, ...); ``None`` in older entries.
    """

    pipeline: str
    stage_names: Sequence[str]
    stage_versions: Sequence[str]
    params: Sequence[Mapping[str, Any]]
    compute_seconds: Sequence[float]
    trial_id: str | None = None
    compute_energy_joules: Sequence[float | None] | None = None
    energy_sources: Sequence[str] | None = None

    def expected_key(self) -> str:
        key = root_key(self.pipeline)
        for i, (name, version, params) in enumerate(
            zip(self.stage_names, self.stage_versions, self.params, strict=True), start=1
        ):
            key = chain_key(key, i, name, version, params)
        return key


@dataclass(frozen=True)
class Manifest:
    key: str
    meta: EntryMeta
    codec: str
    codec_meta: Mapping[str, Any]
    data_dir: str
    files: tuple[FileRecord, ...]
    created_at: float
    producer: Mapping[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def stage(self) -> str:
        return self.meta.stage_names[-1]

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["total_bytes"] = self.total_bytes
        return json.dumps(doc, sort_keys=True, default=_json_default).encode()

    @classmethod
    def from_json(cls, raw: bytes, expected_key: str) -> Manifest:
        """Parse and check a manifest; raise :class:`CacheIntegrityError` if it is
        unreadable, of another format, malformed, or belongs to another key.

        Everything a reader later trusts is checked here: the key (against
        ``expected_key`` and against the key its own stages and hyperparameters
        produce), the data directory and part names (single safe path
        components, so a forged manifest cannot steer a read outside its entry),
        and the types of sizes, checksums and per-stage compute costs.
        """
        try:
            doc = json.loads(raw)
        except ValueError as exc:  # also UnicodeDecodeError
            raise CacheIntegrityError(f"unreadable manifest (not JSON): {exc}") from exc
        if not isinstance(doc, dict):
            raise CacheIntegrityError(
                f"unreadable manifest: a JSON {type(doc).__name__}, not an object"
            )
        fmt = doc.get("format")
        if type(fmt) is not int or fmt != MANIFEST_FORMAT:  # bool is not a format number
            raise CacheIntegrityError(f"manifest format {fmt!r}, expected {MANIFEST_FORMAT}")
        try:
            meta = _meta_from_doc(doc["meta"])
            manifest = cls(
                key=_typed(doc["key"], str, "key"),
                meta=meta,
                codec=_typed(doc["codec"], str, "codec"),
                codec_meta=_typed(doc["codec_meta"], dict, "codec_meta"),
                data_dir=_typed(doc["data_dir"], str, "data_dir"),
                files=tuple(_file_from_doc(f) for f in _typed(doc["files"], list, "files")),
                created_at=float(_number(doc["created_at"], "created_at")),
                producer=_typed(doc.get("producer", {}), dict, "producer"),
            )
        except CacheIntegrityError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CacheIntegrityError(f"unreadable manifest: {exc!r}") from exc
        if manifest.key != expected_key:
            raise CacheIntegrityError(
                f"manifest is for key {manifest.key[:16]}..., not {expected_key[:16]}..."
            )
        try:
            derived = meta.expected_key()
        except (ValueError, TypeError) as exc:
            raise CacheIntegrityError(f"manifest's prefix cannot be keyed: {exc}") from exc
        if derived != expected_key:
            raise CacheIntegrityError(
                "manifest's pipeline/stages/hyperparameters do not produce its key"
            )
        if not _DATA_DIR_RE.fullmatch(manifest.data_dir):
            raise CacheIntegrityError(f"manifest data_dir {manifest.data_dir!r} is not valid")
        names = [f.name for f in manifest.files]
        if len(set(names)) != len(names):
            raise CacheIntegrityError("manifest lists a part twice")
        return manifest


def _typed(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CacheIntegrityError(
            f"manifest field {what!r} is a {type(value).__name__}, expected {kind.__name__}"
        )
    return value


def _number(value: Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CacheIntegrityError(f"manifest field {what!r} = {value!r} is not a number")
    return value


def _meta_from_doc(doc: Any) -> EntryMeta:
    doc = _typed(doc, dict, "meta")
    meta = EntryMeta(**doc)  # unknown or missing fields: TypeError, reported by the caller
    _typed(meta.pipeline, str, "meta.pipeline")
    lists = {
        name: _typed(getattr(meta, name), list, f"meta.{name}")
        for name in ("stage_names", "stage_versions", "params", "compute_seconds")
    }
    lengths = {name: len(v) for name, v in lists.items()}
    if not lists["stage_names"] or len(set(lengths.values())) != 1:
        raise CacheIntegrityError(f"manifest stage lists are empty or differ in length: {lengths}")
    for name in lists["stage_names"]:
        _typed(name, str, "meta.stage_names[]")
    for version in lists["stage_versions"]:
        _typed(version, str, "meta.stage_versions[]")
    for params in lists["params"]:
        _typed(params, dict, "meta.params[]")
    for seconds in lists["compute_seconds"]:
        _number(seconds, "meta.compute_seconds[]")
    if meta.trial_id is not None:
        _typed(meta.trial_id, str, "meta.trial_id")
    # Energy fields are optional (absent from entries written before them).
    n = lengths["stage_names"]
    if meta.compute_energy_joules is not None:
        energies = _typed(meta.compute_energy_joules, list, "meta.compute_energy_joules")
        if len(energies) != n:
            raise CacheIntegrityError(
                f"manifest lists {len(energies)} stage energies for {n} stages"
            )
        for joules in energies:
            if joules is not None and _number(joules, "meta.compute_energy_joules[]") < 0:
                raise CacheIntegrityError(f"manifest stage energy {joules!r} is negative")
    if meta.energy_sources is not None:
        sources = _typed(meta.energy_sources, list, "meta.energy_sources")
        if len(sources) != n:
            raise CacheIntegrityError(
                f"manifest lists {len(sources)} energy sources for {n} stages"
            )
        for source in sources:
            _typed(source, str, "meta.energy_sources[]")
    return meta


def _file_from_doc(doc: Any) -> FileRecord:
    doc = _typed(doc, dict, "files[]")
    record = FileRecord(**doc)
    try:
        check_part_name(_typed(record.name, str, "files[].name"))
    except CodecError as exc:
        raise CacheIntegrityError(f"manifest lists an unsafe part: {exc}") from exc
    size = _typed(record.size, int, "files[].size")
    if size < 0:
        raise CacheIntegrityError(f"manifest part {record.name!r} has negative size {size}")
    if not _HEX_DIGEST_RE.fullmatch(_typed(record.xxh3_128, str, "files[].xxh3_128")):
        raise CacheIntegrityError(f"manifest part {record.name!r} has a malformed checksum")
    return record


def _json_default(value: Any) -> Any:
    """JSON for what ``json`` does not know natively. Hyperparameters must read
    back as values that produce the same prefix key, so NumPy scalars become the
    Python scalar they hold (as :func:`~eeipu_ray.keys.canonicalize`
    treats them) and mappings/sequences become dicts/lists; anything else is
    written as its ``repr`` (for free-form fields such as ``codec_meta``), and
    :meth:`PrefixCache.store` refuses metadata that does not read back."""
    if (
        type(value).__module__ == "numpy"
        and getattr(value, "ndim", 1) == 0
        and hasattr(value, "item")
    ):
        return value.item()
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence | set | frozenset) and not isinstance(
        value, str | bytes | bytearray
    ):
        return list(value)
    return repr(value)


def checksum(data: PartData) -> str:
    h = xxhash.xxh3_128()
    for blob in iter_blobs(data):
        h.update(blob)
    return h.hexdigest()


def verify_part(record: FileRecord, blob: Any) -> None:
    size = memoryview(blob).nbytes
    if size != record.size:
        raise CacheIntegrityError(f"part {record.name!r} has {size} bytes, expected {record.size}")
    digest = checksum(blob)
    if digest != record.xxh3_128:
        raise CacheIntegrityError(f"part {record.name!r} checksum mismatch")


def producer_info(trial_id: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    if trial_id:
        info["trial_id"] = trial_id
    node_id = os.environ.get("EEIPU_NODE_ID")
    if node_id:
        info["node_id"] = node_id
    return info


__all__ = [
    "MANIFEST_FORMAT",
    "EntryMeta",
    "FileRecord",
    "Manifest",
    "check_key",
    "checksum",
    "producer_info",
    "verify_part",
]
