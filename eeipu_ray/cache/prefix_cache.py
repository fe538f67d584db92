"""`PrefixCache`: stage outputs keyed by prefix key, over one or two storage layers."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eeipu_ray.cache.codecs import Codec, CodecRegistry, Encoded
from eeipu_ray.cache.fs_store import (
    DEFAULT_UNREACHABLE_COOLDOWN,
    FsStore,
    StoredEntry,
    redact_url,
)
from eeipu_ray.cache.manifest import (
    EntryMeta,
    FileRecord,
    Manifest,
    checksum,
    producer_info,
    verify_part,
)
from eeipu_ray.errors import CacheConfigError, CacheIntegrityError, CodecError
from eeipu_ray.keys import check_key

logger = logging.getLogger("eeipu_ray.cache")

DEFAULT_CACHE_DIR_ENV = "EEIPU_CACHE_DIR"


def default_cache_dir() -> str:
    """``$EEIPU_CACHE_DIR``, else ``~/.cache/eeipu-ray/prefix-cache``."""
    return os.environ.get(DEFAULT_CACHE_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "eeipu-ray", "prefix-cache"
    )


@dataclass(frozen=True)
class CacheHit:
    """A loaded entry.

    Attributes:
        value: The decoded stage output.
        manifest: The entry's manifest (compute seconds of each stage, producer...).
        seconds: Wall-clock seconds this load took (read, verify, decode).
        layer: ``"object_store"`` or ``"durable"``.
    """

    value: Any
    manifest: Manifest
    seconds: float
    layer: str


@dataclass(frozen=True)
class StoreResult:
    key: str
    bytes: int
    seconds: float
    published: bool  # False: another writer's entry for this key was already there


class PrefixCache:
    """A cache of pipeline stage outputs, keyed by prefix key.

    Layers:

    * a durable layer on any fsspec URL: a local directory (the default,
      ``$EEIPU_CACHE_DIR`` or ``~/.cache/eeipu-ray/prefix-cache``), ``s3://bucket/prefix``
      (s3fs; endpoint, credentials and region from the AWS environment or
      ``storage_options``), or another fsspec filesystem;
    * optionally, the Ray object store as a fast in-cluster layer in front of it
      (``object_store="name"``): a named, detached actor owns the objects, so they
      outlive the trial that produced them. With ``url=None`` and an
      ``object_store`` name, the object store is the only layer.

    Entries are published atomically and carry per-file checksums; a partial,
    corrupted or mismatched entry is a miss: it is removed and logged, never
    handed to a stage. ``byte_budget`` bounds the durable layer with
    least-recently-used eviction; pinned prefixes are never evicted.

    Args:
        url: Durable location, or ``None`` (see above).
        object_store: Name of the Ray object-store layer, or ``None``.
        byte_budget: Bytes the durable layer may hold; ``None`` for no limit.
        object_store_budget: Bytes the object-store layer may hold.
        allow_pickle: Store values no codec knows with pickle, and read pickled
            entries. Only for caches whose writers you all trust.
        codecs: Extra codecs, tried before the built-in ones.
        storage_options: fsspec options for ``url`` (never logged or shown). For
            ``s3://``, ``retries`` (s3fs attempts per call, default 2) and
            ``config_kwargs`` (botocore ``retries`` -- default
            ``{"mode": "standard", "max_attempts": 2}``, i.e. 3 attempts with
            exponential backoff -- ``connect_timeout`` 5 s, ``read_timeout``
            15 s) bound how long a call waits on a failing endpoint.
        touch_interval: Seconds between "last used" updates of one entry.
        unreachable_cooldown: After a remote durable layer was found
            unreachable, seconds during which its calls fail at once with
            :class:`~eeipu_ray.cache.errors.CacheUnreachableError` instead of
            waiting out the retries again (a trial then pays the timeouts once,
            not once per stage); ``0`` asks the store every time.

    Failures of the storage: every method raises the cache's own errors
    (:mod:`eeipu_ray.cache.errors`), never the storage library's:
    ``CacheUnreachableError`` when the store does not answer within the bounded
    retries, ``CacheStorageError`` for other refusals (a full disk, no
    permission, a missing bucket), ``CacheConfigError`` for a bad URL or
    option. A failed write leaves no visible entry.

    Example:
        >>> cache = PrefixCache("/tmp/eeipu-cache", byte_budget=10 * 2**30)
        >>> cache = PrefixCache("s3://my-bucket/sweeps/t5", object_store="t5-sweep")
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        object_store: str | None = None,
        byte_budget: int | None = None,
        object_store_budget: int | None = None,
        allow_pickle: bool = False,
        codecs: Sequence[Codec] = (),
        storage_options: Mapping[str, Any] | None = None,
        touch_interval: float = 30.0,
        unreachable_cooldown: float = DEFAULT_UNREACHABLE_COOLDOWN,
    ) -> None:
        if url is None and object_store is None:
            url = default_cache_dir()
        if url is not None and not isinstance(url, str | os.PathLike):
            raise CacheConfigError(f"cache url must be a string or path, got {url!r}")
        for name, budget in (
            ("byte_budget", byte_budget),
            ("object_store_budget", object_store_budget),
        ):
            if budget is not None and (
                isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0
            ):
                raise CacheConfigError(
                    f"{name} must be a positive int of bytes (e.g. 10 * 2**30), got {budget!r}"
                )
        if object_store is not None and (not isinstance(object_store, str) or not object_store):
            raise CacheConfigError(f"object_store must be a non-empty name, got {object_store!r}")
        for name, seconds in (
            ("touch_interval", touch_interval),
            ("unreachable_cooldown", unreachable_cooldown),
        ):
            if not _is_seconds(seconds):
                raise CacheConfigError(
                    f"{name} must be a finite number of seconds >= 0, got {seconds!r}"
                )
        if url is not None:
            url = os.fspath(url)
            if not url:
                raise CacheConfigError(
                    "cache url is empty; give a directory or an s3://bucket/prefix URL"
                )
            # Ray Tune runs trials in their own working directory: pin local paths
            # (bare or file://) to absolute ones, so every process means one place.
            if "://" not in url:
                url = os.path.abspath(os.path.expanduser(url))
            elif url.startswith("file://") and not url[len("file://") :].startswith("/"):
                url = "file://" + os.path.abspath(url[len("file://") :])
        self.url = url
        self.object_store = object_store
        self.byte_budget = byte_budget
        self.object_store_budget = object_store_budget
        self.allow_pickle = allow_pickle
        self.touch_interval = touch_interval
        self.codecs = CodecRegistry(codecs, allow_pickle=allow_pickle)
        # FsStore checks the URL's scheme now: a typo fails here, not in a trial.
        self._durable = (
            FsStore(self.url, storage_options, unreachable_cooldown=unreachable_cooldown)
            if self.url is not None
            else None
        )
        self._l1: Any = None
        self._touched: dict[str, float] = {}

    def __repr__(self) -> str:
        layers = [f"url={redact_url(self.url)!r}"] if self.url else []
        if self.object_store:
            layers.append(f"object_store={self.object_store!r}")
        return f"PrefixCache({', '.join(layers)})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_l1": None, "_touched": {}}

    # ---------------------------------------------------------------- layers
    @property
    def durable(self) -> FsStore | None:
        return self._durable

    @property
    def l1(self) -> Any:
        """The object-store layer client (``None`` without one)."""
        if self.object_store is None:
            return None
        if self._l1 is None:
            from eeipu_ray.cache.ray_store import ObjectStoreLayer

            self._l1 = ObjectStoreLayer(self.object_store, self.object_store_budget)
        return self._l1

    # ----------------------------------------------------------------- reads
    def contains(self, key: str) -> bool:
        """Whether a complete entry for ``key`` is visible (no payload is read)."""
        check_key(key)
        if self.l1 is not None and self.l1.contains(key):
            return True
        return self._durable is not None and self._durable.exists(key)

    def load(self, key: str, *, workdir: str | os.PathLike[str] | None = None) -> CacheHit | None:
        """Load and decode the entry for ``key``; ``None`` on a miss.

        A partial, corrupted or mismatched entry is removed, logged, and
        reported as a miss.

        Args:
            key: A prefix key.
            workdir: Local directory where codecs that restore files (``Path``
                values) put them; a temporary directory by default.

        Raises:
            CacheUnreachableError: the durable layer did not answer (names the
                URL and the key); the entry may well exist. The memoized runner
                treats this as a miss and computes the stage.
            CacheStorageError: the durable layer refused the read otherwise.
        """
        check_key(key)
        start = time.perf_counter()
        if self.l1 is not None:
            found = self._l1_get(key)
            if found is not None:
                manifest, parts = found
                value = self._decode_into(key, manifest, parts, workdir, layer="object_store")
                if value is not _MISS:
                    return CacheHit(value, manifest, time.perf_counter() - start, "object_store")
        if self._durable is None:
            return None
        found_durable = self._read_durable(key)
        if found_durable is None:
            return None
        manifest, parts, raw = found_durable
        value = self._decode_into(key, manifest, parts, workdir, layer="durable", raw=raw)
        if value is _MISS:
            return None
        self._touch(key)
        if self.l1 is not None:  # promote; the durable copy stays authoritative
            self.l1.put(key, manifest, _as_arrays(parts))
        return CacheHit(value, manifest, time.perf_counter() - start, "durable")

    def _l1_get(self, key: str) -> tuple[Manifest, dict[str, Any]] | None:
        try:
            return self.l1.get(key)
        except CacheIntegrityError as exc:
            self._drop(key, None, str(exc), layer="object_store")
            return None

    def _read_durable(self, key: str) -> tuple[Manifest, dict[str, Any], bytes] | None:
        """The durable entry's checked manifest, its parts (not yet verified) and
        the manifest's bytes; ``None`` on a miss (a broken manifest or a partial
        entry is dropped first). A storage that fails raises (``CacheStorageError``):
        "could not read" is not "not there"."""
        assert self._durable is not None
        # A second attempt only when the manifest changed under us: a racing
        # writer replaced it, or the entry was deleted (evicted) while we read.
        for _attempt in range(2):
            raw = self._durable.read_manifest(key)
            if raw is None:
                return None
            try:
                manifest = Manifest.from_json(raw, key)
            except CacheIntegrityError as exc:
                self._drop(key, None, str(exc), raw=raw)
                return None
            parts: dict[str, Any] = {}
            try:
                for record in manifest.files:
                    parts[record.name] = self._durable.read_part(
                        key, manifest.data_dir, record.name
                    )
            except FileNotFoundError:
                if self._durable.read_manifest(key) != raw:
                    continue
                self._drop(
                    key,
                    manifest.stage,
                    f"partial entry: data file {record.name!r} is missing",
                    raw=raw,
                )
                return None
            return manifest, parts, raw
        return None

    def manifest(self, key: str) -> Manifest | None:
        """The manifest of ``key``'s entry (checked against the key), or ``None``."""
        check_key(key)
        if self.l1 is not None:
            try:
                found = self.l1.manifest(key)
            except CacheIntegrityError as exc:
                self._drop(key, None, str(exc), layer="object_store")
                found = None
            if found is not None:
                return found
        return self._read_manifest(key) if self._durable is not None else None

    def verify(self, key: str) -> Manifest:
        """Read and checksum every part of the durable entry; raise
        :class:`CacheIntegrityError` instead of dropping it."""
        check_key(key)
        if self._durable is None:
            raise CacheConfigError(
                "verify() checks the durable layer; this cache has none (url=None)"
            )
        raw = self._durable.read_manifest(key)
        if raw is None:
            raise CacheIntegrityError(f"no entry for key {key[:16]}...")
        try:
            manifest = Manifest.from_json(raw, key)
            for record in manifest.files:
                try:
                    blob = self._durable.read_part(key, manifest.data_dir, record.name)
                except FileNotFoundError as exc:
                    raise CacheIntegrityError(f"part {record.name!r} is missing") from exc
                verify_part(record, blob)
        except CacheIntegrityError as exc:
            raise CacheIntegrityError(f"entry {key[:16]}...: {exc}") from exc
        return manifest

    def _read_manifest(self, key: str) -> Manifest | None:
        assert self._durable is not None
        raw = self._durable.read_manifest(key)
        if raw is None:
            return None
        try:
            return Manifest.from_json(raw, key)
        except CacheIntegrityError as exc:
            self._drop(key, None, str(exc), raw=raw)
            return None

    def _decode_into(
        self,
        key: str,
        manifest: Manifest,
        parts: Mapping[str, Any],
        workdir: str | os.PathLike[str] | None,
        *,
        layer: str,
        raw: bytes | None = None,
    ) -> Any:
        """Decode into ``workdir``, or into a fresh temporary directory that is
        removed again when the codec left nothing in it."""
        if workdir is not None:
            return self._decode(key, manifest, parts, Path(workdir), layer=layer, raw=raw)
        scratch = Path(tempfile.mkdtemp(prefix="eeipu-restore-"))
        try:
            return self._decode(key, manifest, parts, scratch, layer=layer, raw=raw)
        finally:
            with contextlib.suppress(OSError):  # not empty: restored files live there
                scratch.rmdir()

    def _decode(
        self,
        key: str,
        manifest: Manifest,
        parts: Mapping[str, Any],
        workdir: Path,
        *,
        layer: str,
        raw: bytes | None = None,
    ) -> Any:
        try:
            if set(parts) != {f.name for f in manifest.files}:
                raise CacheIntegrityError("parts do not match the manifest's file list")
            for record in manifest.files:
                verify_part(record, parts[record.name])
            workdir.mkdir(parents=True, exist_ok=True)
            return self.codecs.decode(manifest.codec, parts, manifest.codec_meta, workdir)
        except CacheIntegrityError as exc:
            self._drop(key, manifest.stage, str(exc), layer=layer, raw=raw)
        except CodecError as exc:
            # Written by a codec or setting this reader lacks: a miss, but not
            # corrupt; leave it for the readers that can use it.
            logger.warning(
                "prefix cache: cannot decode entry %s (stage %r): %s", key[:12], manifest.stage, exc
            )
        except Exception as exc:  # noqa: BLE001 - a codec choking on verified bytes
            self._drop(key, manifest.stage, f"decode failed: {exc!r}", layer=layer, raw=raw)
        return _MISS

    def _drop(
        self,
        key: str,
        stage: str | None,
        reason: str,
        layer: str = "durable",
        raw: bytes | None = None,
    ) -> None:
        """Remove a broken entry and log why. For the durable layer, ``raw`` is
        the manifest the reader judged: an entry whose manifest has changed since
        (another writer published a good one) is left alone."""
        logger.warning(
            "prefix cache: dropping entry %s%s from the %s layer and treating it as a miss: %s",
            key[:12],
            f" (stage {stage!r})" if stage else "",
            layer,
            reason,
        )
        try:
            if layer == "object_store":
                if self.l1 is not None:
                    self.l1.delete(key)
            elif self._durable is not None:
                if raw is None:
                    self._durable.delete(key)
                elif not self._durable.delete_if_unchanged(key, raw):
                    logger.info(
                        "prefix cache: entry %s was replaced meanwhile; kept the new one", key[:12]
                    )
        except OSError as exc:  # a reader must not fail because cleanup did
            logger.warning("prefix cache: could not remove entry %s: %s", key[:12], exc)

    def _touch(self, key: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(key, -1e18) >= self.touch_interval:
            self._touched[key] = now
            assert self._durable is not None
            self._durable.touch(key)

    # ---------------------------------------------------------------- writes
    def store(self, key: str, value: Any, meta: EntryMeta) -> StoreResult:
        """Encode and publish ``value`` as the entry for ``key``.

        Raises:
            CodecError: naming the stage when no codec can store the value.
            CacheIntegrityError: when ``meta`` does not produce ``key`` (or would
                not read back as it).
            CacheStorageError: (also an ``OSError``) when the backend refuses
                the write (``CacheUnreachableError``: it does not answer): nothing
                of this write is visible as an entry.
        """
        check_key(key)
        start = time.perf_counter()
        _check_meta(key, meta)
        encoded = self.codecs.encode(value, stage=meta.stage_names[-1])
        producer = producer_info(meta.trial_id)

        def manifest_for(data_dir: str, files: tuple[FileRecord, ...]) -> Manifest:
            return Manifest(
                key=key,
                meta=meta,
                codec=encoded.codec,
                codec_meta=encoded.meta,
                data_dir=data_dir,
                files=files,
                created_at=time.time(),
                producer=producer,
            )

        # The manifest must read back as exactly this entry (hyperparameters that
        # JSON cannot hold would make it unloadable): check before writing.
        try:
            Manifest.from_json(manifest_for("d-check", ()).to_json(), key)
        except CacheIntegrityError as exc:
            raise CacheIntegrityError(
                f"stage {meta.stage_names[-1]!r}: the entry's metadata does not survive JSON "
                f"({exc}); hyperparameters must be None/bool/int/float/str or lists and "
                "str-keyed dicts of those"
            ) from exc

        parts = encoded.parts
        flat: dict[str, Any] | None = None
        if self.l1 is not None:
            # The object store needs buffers: materialize streamed parts once.
            flat = _flatten(encoded)
            parts = flat
        published = False
        files: tuple[FileRecord, ...] = ()
        if self._durable is not None:
            published, _, files = self._durable.publish(
                key,
                parts,
                lambda d, fs: manifest_for(d, fs).to_json(),
                stage=meta.stage_names[-1],
            )
        if flat is not None:
            if not files:
                files = tuple(FileRecord(n, int(b.nbytes), checksum(b)) for n, b in flat.items())
            l1_published = self.l1.put(key, manifest_for("d-object-store", files), flat)
            published = published if self._durable is not None else l1_published
        total = sum(f.size for f in files)
        if self.byte_budget is not None and self._durable is not None:
            try:
                self._evict(self.byte_budget, just_stored=key)
            except OSError as exc:  # the entry is stored; enforcing the budget can wait
                logger.warning("prefix cache: could not enforce the byte budget: %s", exc)
        return StoreResult(key, total, time.perf_counter() - start, published)

    def delete(self, key: str) -> None:
        check_key(key)
        if self.l1 is not None:
            self.l1.delete(key)
        if self._durable is not None:
            self._durable.delete(key)

    # ------------------------------------------------------------------ pins
    def pin(self, key: str) -> None:
        """Protect ``key``'s entry from eviction (the searcher means to reuse it)."""
        check_key(key)
        if self._durable is not None:
            self._durable.pin(key)
        if self.l1 is not None:
            self.l1.pin(key)

    def unpin(self, key: str) -> None:
        check_key(key)
        if self._durable is not None:
            self._durable.unpin(key)
        if self.l1 is not None:
            self.l1.unpin(key)

    def pinned(self) -> set[str]:
        keys: set[str] = set()
        if self._durable is not None:
            keys |= self._durable.pinned()
        if self.l1 is not None:
            keys |= self.l1.pinned()
        return keys

    # ------------------------------------------------------ listing & budget
    def entries(self) -> list[StoredEntry]:
        """Durable entries, complete or not, with size and last use."""
        return self._durable.entries() if self._durable is not None else []

    def stats(self) -> dict[str, Any]:
        entries = [e for e in self.entries() if e.complete]
        out: dict[str, Any] = {
            "url": self.url,
            "entries": len(entries),
            "bytes": sum(e.bytes for e in entries),
            "pinned": sum(e.pinned for e in entries),
            "byte_budget": self.byte_budget,
        }
        if self.l1 is not None:
            out["object_store"] = self.l1.stats()
        return out

    def evict(self, target_bytes: int | None = None) -> list[str]:
        """Evict least-recently-used, unpinned durable entries until the layer
        holds at most ``target_bytes`` (default: ``byte_budget``). Returns the
        evicted keys. Pinned entries are kept even if that leaves it over budget."""
        if target_bytes is not None and (
            isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes < 0
        ):
            raise CacheConfigError(
                f"target_bytes must be an int of bytes >= 0, got {target_bytes!r}"
            )
        limit = self.byte_budget if target_bytes is None else target_bytes
        if limit is None or self._durable is None:
            return []
        return self._evict(limit)

    def _evict(self, limit: int, just_stored: str | None = None) -> list[str]:
        # Only complete entries count and go: data without a manifest may be a
        # write in progress, and is gc()'s to remove once it is old.
        entries = [e for e in self._durable.entries() if e.complete]  # type: ignore[union-attr]
        total = sum(e.bytes for e in entries)
        evicted: list[str] = []
        # Oldest use first; on equal times (S3 keeps whole seconds) the entry just
        # stored goes last.
        for entry in sorted(entries, key=lambda e: (e.last_used, e.key == just_stored)):
            if total <= limit:
                break
            if entry.pinned:
                continue
            self._durable.delete(entry.key)  # type: ignore[union-attr]
            total -= entry.bytes
            evicted.append(entry.key)
        if evicted:
            logger.info(
                "prefix cache: evicted %d entries (LRU) to stay within %d bytes",
                len(evicted),
                limit,
            )
        if total > limit:
            pinned = sum(e.bytes for e in entries if e.pinned)
            logger.warning(
                "prefix cache holds %d bytes, over its budget of %d, because %d bytes are in "
                "pinned entries; unpin() prefixes the searcher no longer needs",
                total,
                limit,
                pinned,
            )
        return evicted

    def gc(self, older_than: float = 3600.0) -> list[str]:
        """Remove leftovers of interrupted writes (unreferenced data, temp files)
        older than ``older_than`` seconds. Returns the removed paths."""
        if (
            isinstance(older_than, bool)
            or not isinstance(older_than, int | float)
            or not (older_than >= 0)
        ):
            raise CacheConfigError(f"older_than must be seconds >= 0, got {older_than!r}")
        if self._durable is None:
            return []
        return self._durable.collect_garbage(older_than)

    def clear(self) -> None:
        """Remove every entry and pin (both layers)."""
        for entry in self.entries():
            self._durable.delete(entry.key)  # type: ignore[union-attr]
        for key in self.pinned():
            self.unpin(key)
        if self.l1 is not None:
            self.l1.clear()


def _check_meta(key: str, meta: EntryMeta) -> None:
    if not isinstance(meta, EntryMeta):
        raise TypeError(f"meta must be an EntryMeta, got {type(meta).__name__}")
    lengths = {
        name: len(getattr(meta, name))
        for name in ("stage_names", "stage_versions", "params", "compute_seconds")
    }
    if not lengths["stage_names"] or len(set(lengths.values())) != 1:
        raise CacheIntegrityError(
            f"entry metadata for key {key[:16]}... needs one name, version, params dict and "
            f"compute cost per stage (at least one stage), got {lengths}"
        )
    try:
        expected = meta.expected_key()
    except ValueError as exc:  # PrefixKeyError: an unkeyable hyperparameter
        raise CacheIntegrityError(
            f"stage {meta.stage_names[-1]!r}: entry metadata cannot be keyed: {exc}"
        ) from exc
    if expected != key:
        raise CacheIntegrityError(
            f"stage {meta.stage_names[-1]!r}: entry metadata does not produce key {key[:16]}..."
        )


class _Miss:
    pass


_MISS = _Miss()


def _as_arrays(parts: Mapping[str, Any]) -> dict[str, Any]:
    """Read buffers (memory maps, bytes) as NumPy byte arrays Ray can serialize."""
    import numpy as np

    return {n: np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8) for n, b in parts.items()}


def _flatten(encoded: Encoded) -> dict[str, Any]:
    """Parts as single contiguous NumPy byte arrays, for zero-copy transport
    through the Ray object store."""
    import numpy as np

    from eeipu_ray.cache.codecs import iter_blobs

    out: dict[str, Any] = {}
    for name, data in encoded.parts.items():
        blobs = iter_blobs(data)
        if len(blobs) == 1:
            out[name] = np.frombuffer(memoryview(blobs[0]).cast("B"), dtype=np.uint8)
        else:
            out[name] = (
                np.concatenate(
                    [np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8) for b in blobs]
                )
                if blobs
                else np.empty(0, np.uint8)
            )
    return out


def _is_seconds(value: Any) -> bool:
    """A finite, non-negative number of seconds (an int beyond the float range is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:
        return False
