"""The manifest: the small JSON document that makes a cache entry visible.

An entry is published by writing its data first and its manifest last, so a
reader either sees no manifest (no entry) or a manifest whose files were all
written. The manifest carries a checksum (xxh3-128) and size per file; readers
verify both before a single byte reaches a codec.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from eeipu_ray.cache.codecs import PartData, iter_blobs
from eeipu_ray.errors import CacheIntegrityError
from eeipu_ray.pipeline.keys import chain_key, check_key, root_key

MANIFEST_FORMAT = 1


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
    """

    pipeline: str
    stage_names: Sequence[str]
    stage_versions: Sequence[str]
    params: Sequence[Mapping[str, Any]]
    compute_seconds: Sequence[float]
    trial_id: str | None = None

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
        return json.dumps(doc, sort_keys=True, default=repr).encode()

    @classmethod
    def from_json(cls, raw: bytes, expected_key: str) -> Manifest:
        """Parse and check a manifest; raise :class:`CacheIntegrityError` if it is
        unreadable, of another format, or belongs to another key."""
        try:
            doc = json.loads(raw)
            if doc.get("format") != MANIFEST_FORMAT:
                raise CacheIntegrityError(
                    f"manifest format {doc.get('format')!r}, expected {MANIFEST_FORMAT}"
                )
            meta = EntryMeta(**doc["meta"])
            manifest = cls(
                key=doc["key"],
                meta=meta,
                codec=doc["codec"],
                codec_meta=doc["codec_meta"],
                data_dir=doc["data_dir"],
                files=tuple(FileRecord(**f) for f in doc["files"]),
                created_at=float(doc["created_at"]),
                producer=doc.get("producer", {}),
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
        if not manifest.data_dir.startswith("d-") or "/" in manifest.data_dir:
            raise CacheIntegrityError(f"manifest data_dir {manifest.data_dir!r} is not valid")
        return manifest


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


__all__ = ["MANIFEST_FORMAT", "EntryMeta", "FileRecord", "Manifest", "check_key", "checksum",
           "producer_info", "verify_part"]
