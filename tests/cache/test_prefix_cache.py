"""The durable prefix cache on a real local directory and on a real S3 API.

Backend-generic tests run twice: on ``tmp_path`` and on a bucket of the
loopback moto S3 server (``s3_server``/``s3_bucket`` from ``tests/conftest.py``).
Entries are tampered with through an independent fsspec filesystem, as another
process (or a disk) would.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eeipu_ray.cache import EntryMeta, PrefixCache
from eeipu_ray.cache.fs_store import CacheStorageError, FsStore
from eeipu_ray.cache.manifest import Manifest, checksum
from eeipu_ray.errors import (
    CacheConfigError,
    CacheError,
    CacheIntegrityError,
    PrefixKeyError,
)

LOGGER = "eeipu_ray.cache"


# ------------------------------------------------------------------ helpers
def make_meta(
    i: int = 0, *, params: dict[str, Any] | None = None, pipeline: str = "toy"
) -> EntryMeta:
    """Metadata of a two-stage prefix; ``i`` varies the hyperparameters."""
    return EntryMeta(
        pipeline=pipeline,
        stage_names=["load", "prep"],
        stage_versions=["1", "2"],
        params=[{"n": 100}, params if params is not None else {"scale": float(i), "i": i}],
        compute_seconds=[0.5, 2.25 + i],
        trial_id=f"trial-{i}",
    )


def entry_for(i: int = 0, **kwargs: Any) -> tuple[str, EntryMeta]:
    meta = make_meta(i, **kwargs)
    return meta.expected_key(), meta


def value_for(i: int = 0, size: int = 2000) -> np.ndarray:
    return np.arange(size, dtype=np.float64) + i


@dataclass
class Backend:
    """A cache location plus an independent filesystem handle to inspect and tamper with it."""

    name: str
    url: str
    storage_options: dict[str, Any] | None
    fs: Any
    root: str  # the cache root as a path of ``fs``
    container: str  # what the test owns: tmp_path or the bucket

    def cache(self, **kwargs: Any) -> PrefixCache:
        return PrefixCache(self.url, storage_options=self.storage_options, **kwargs)

    def entry(self, key: str) -> str:
        return f"{self.root}/entries/{key}"

    def data_path(self, cache: PrefixCache, key: str) -> str:
        manifest = cache.manifest(key)
        assert manifest is not None
        return f"{self.entry(key)}/{manifest.data_dir}/{manifest.files[0].name}"

    def all_files(self) -> list[str]:
        return sorted(self.fs.find(self.container))

    def age(self, key: str, seconds: float) -> None:
        """Make ``key``'s last use ``seconds`` old (local only: S3 has no utime)."""
        assert self.name == "local"
        t = time.time() - seconds
        os.utime(f"{self.entry(key)}/used", (t, t))


def _local_backend(tmp_path: Path) -> Backend:
    import fsspec

    root = tmp_path / "cache"
    return Backend(
        "local",
        str(root),
        None,
        fsspec.filesystem("file", auto_mkdir=True),
        str(root),
        str(tmp_path),
    )


def _s3_backend(s3_server: dict[str, Any], bucket_url: str) -> Backend:
    import s3fs

    bucket = bucket_url.removeprefix("s3://")
    fs = s3fs.S3FileSystem(
        **s3_server["storage_options"], skip_instance_cache=True, use_listings_cache=False
    )
    return Backend(
        "s3",
        f"{bucket_url}/sweeps/t5",
        dict(s3_server["storage_options"]),
        fs,
        f"{bucket}/sweeps/t5",
        bucket,
    )


@pytest.fixture
def local(tmp_path: Path) -> Backend:
    return _local_backend(tmp_path)


def warnings_about(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.WARNING and key[:12] in r.getMessage()
    ]


# --------------------------------------------------------- 1. round trip
def test_round_trip_manifest_stats_and_entries(backend: Backend, tmp_path: Path) -> None:
    cache = backend.cache()
    key, meta = entry_for(0)
    value = {"X": value_for(0), "cfg": {"alpha": 0.25, "tags": ["a", "b"]}}

    assert not cache.contains(key)
    assert cache.load(key, workdir=tmp_path / "w") is None
    before = time.time()
    result = cache.store(key, value, meta)
    assert result.published and result.key == key and result.bytes > value["X"].nbytes

    assert cache.contains(key)
    hit = cache.load(key, workdir=tmp_path / "w")
    assert hit is not None and hit.layer == "durable" and hit.seconds >= 0
    np.testing.assert_array_equal(hit.value["X"], value["X"])
    assert hit.value["cfg"] == value["cfg"]

    manifest = cache.manifest(key)
    assert manifest is not None and manifest.key == key
    assert list(manifest.meta.params) == [{"n": 100}, {"scale": 0.0, "i": 0}]
    assert list(manifest.meta.compute_seconds) == [0.5, 2.25]
    assert manifest.meta.trial_id == "trial-0"
    assert before - 1 <= manifest.created_at <= time.time() + 1
    assert manifest.producer["host"] == socket.gethostname()
    assert manifest.producer["pid"] == os.getpid()
    assert manifest.producer["trial_id"] == "trial-0"
    assert manifest.total_bytes == result.bytes
    # Every file record carries the size and xxh3 checksum of the bytes on storage.
    for record in manifest.files:
        blob = backend.fs.cat_file(f"{backend.entry(key)}/{manifest.data_dir}/{record.name}")
        assert len(blob) == record.size and checksum(blob) == record.xxh3_128
    assert cache.verify(key) == manifest

    stats = cache.stats()
    assert stats["entries"] == 1 and stats["pinned"] == 0 and stats["byte_budget"] is None
    assert stats["bytes"] >= result.bytes
    (entry,) = cache.entries()
    assert entry.key == key and entry.complete and not entry.pinned
    assert entry.bytes == stats["bytes"] and entry.last_used > 0

    # A second writer of the same key finds the entry and publishes nothing.
    again = cache.store(key, value, meta)
    assert not again.published
    assert len(cache.entries()) == 1

    cache.delete(key)
    assert not cache.contains(key) and cache.load(key) is None and cache.entries() == []


def test_path_values_restore_into_workdir(backend: Backend, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "weights.bin").write_bytes(b"\x00\x01" * 500)
    (ckpt / "sub" / "config.json").write_text('{"layers": 2}')
    cache = backend.cache()
    key, meta = entry_for(1)
    cache.store(key, ckpt, meta)
    hit = cache.load(key, workdir=tmp_path / "restore")
    assert hit is not None
    restored = Path(hit.value)
    assert restored.is_relative_to(tmp_path / "restore")
    assert (restored / "weights.bin").read_bytes() == b"\x00\x01" * 500
    assert (restored / "sub" / "config.json").read_text() == '{"layers": 2}'


def test_numpy_scalar_hyperparameters_round_trip(backend: Backend) -> None:
    # NumPy scalars key like the Python scalars they hold; their manifest must
    # read back as the same key, or the entry would be dropped on every load.
    cache = backend.cache()
    key, meta = entry_for(params={"lr": np.float32(0.1), "n": np.int64(3), "on": np.bool_(True)})
    cache.store(key, value_for(), meta)
    hit = cache.load(key)
    assert hit is not None
    assert hit.manifest.meta.params[1] == {"lr": float(np.float32(0.1)), "n": 3, "on": True}


def test_load_without_workdir_leaves_no_temp_dirs(
    local: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    scratch = tmp_path / "tmpdirs"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cache = local.cache()
    key, meta = entry_for(0)
    cache.store(key, value_for(), meta)
    assert cache.load(entry_for(9)[0]) is None  # a miss
    assert cache.load(key) is not None  # a hit whose codec writes no files
    assert list(scratch.iterdir()) == []


def test_store_rejects_metadata_that_does_not_produce_the_key(backend: Backend) -> None:
    cache = backend.cache()
    key, _ = entry_for(0)
    _, other_meta = entry_for(1)
    with pytest.raises(CacheIntegrityError, match="does not produce key"):
        cache.store(key, value_for(), other_meta)
    bad = EntryMeta(
        pipeline="toy",
        stage_names=["a", "b"],
        stage_versions=["1"],
        params=[{}],
        compute_seconds=[1.0],
    )
    with pytest.raises(CacheIntegrityError, match="one name, version"):
        cache.store(key, value_for(), bad)
    assert cache.entries() == []


# --------------------------------------------- 2. atomic publication, gc
def test_entry_is_invisible_until_its_manifest_is_written(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, reader = backend.cache(), backend.cache()
    key, meta = entry_for(0)
    seen: list[tuple[bool, bool, bool, list[str]]] = []
    original = Manifest.to_json

    def spy(self: Manifest) -> bytes:
        if self.data_dir != "d-check":  # store()'s read-back check, before any write
            data = [p for p in backend.fs.find(backend.entry(key)) if f"/{self.data_dir}/" in p]
            seen.append(
                (reader.contains(key), reader.load(key) is None, reader.manifest(key) is None, data)
            )
        return original(self)

    monkeypatch.setattr(Manifest, "to_json", spy)
    cache_result = writer.store(key, value_for(), meta)
    assert cache_result.published
    # When the manifest was produced, the data was already fully written and no
    # reader could see the entry.
    ((visible, load_missed, manifest_missed, data),) = seen
    assert not visible and load_missed and manifest_missed
    assert len(data) == 1
    assert reader.load(key) is not None


def test_data_without_manifest_is_a_miss_and_gc_removes_it(backend: Backend) -> None:
    cache = backend.cache()
    live_key, live_meta = entry_for(1)
    cache.store(live_key, value_for(1), live_meta)
    key, _ = entry_for(0)
    # An interrupted writer: data (and a temporary manifest) but no manifest.
    backend.fs.pipe_file(f"{backend.entry(key)}/d-0123abcd/data", b"\x93NUMPY half-written")
    backend.fs.pipe_file(f"{backend.entry(key)}/d-0123abcd/l0/data", b"more")
    backend.fs.pipe_file(f"{backend.entry(key)}/.d-0123abcd.manifest.tmp", b"{")

    assert not cache.contains(key)
    assert cache.load(key) is None and cache.manifest(key) is None
    partial = [e for e in cache.entries() if e.key == key]
    assert len(partial) == 1 and not partial[0].complete
    assert cache.stats()["entries"] == 1
    assert cache.evict(target_bytes=0) == [live_key]  # eviction leaves writes in progress alone
    cache.store(live_key, value_for(1), live_meta)

    assert cache.gc(older_than=3600) == []  # too young: could be a write in progress
    removed = cache.gc(older_than=0)
    assert len(removed) == 2 and all(key in p for p in removed)
    assert not [p for p in backend.all_files() if key in p]
    if backend.name == "local":
        assert not os.path.exists(backend.entry(key))
    assert [e.key for e in cache.entries()] == [live_key]
    assert cache.load(live_key) is not None  # gc never touches live data


def test_failed_write_leaves_no_visible_entry(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = backend.cache()
    key, meta = entry_for(0)
    original = Manifest.to_json

    def fail_after_data(self: Manifest) -> bytes:
        if self.data_dir != "d-check":
            raise OSError(28, "No space left on device")
        return original(self)

    monkeypatch.setattr(Manifest, "to_json", fail_after_data)
    with pytest.raises(CacheStorageError, match=key[:12]) as info:
        cache.store(key, value_for(), meta)
    assert isinstance(info.value, OSError) and isinstance(info.value, CacheError)
    monkeypatch.setattr(Manifest, "to_json", original)
    assert not cache.contains(key) and cache.load(key) is None
    assert [p for p in backend.all_files() if key in p] == []  # the data was removed too


def test_race_loser_removes_its_data(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = backend.cache(), backend.cache()
    key, meta = entry_for(0)
    assert first.store(key, value_for(), meta).published
    manifest_before = backend.fs.cat_file(f"{backend.entry(key)}/manifest.json")
    # The second writer checked for the entry just before the first published it.
    monkeypatch.setattr(FsStore, "_has_manifest", lambda self, key: False)
    assert not second.store(key, value_for(), meta).published
    monkeypatch.undo()
    assert backend.fs.cat_file(f"{backend.entry(key)}/manifest.json") == manifest_before
    data_dirs = {
        p.split(f"{key}/", 1)[1].split("/", 1)[0]
        for p in backend.fs.find(backend.entry(key))
        if f"{key}/d-" in p
    }
    assert len(data_dirs) == 1
    assert second.load(key) is not None and second.gc(older_than=0) == []


# ---------------------------------------------------------- 3. integrity
def _rewrite_manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
    def tamper(backend: Backend, cache: PrefixCache, key: str, other: str) -> None:
        path = f"{backend.entry(key)}/manifest.json"
        doc = json.loads(backend.fs.cat_file(path))
        edit(doc)
        backend.fs.pipe_file(path, json.dumps(doc).encode())

    return tamper


def _remove_part(backend: Backend, cache: PrefixCache, key: str, other: str) -> None:
    backend.fs.rm(backend.data_path(cache, key))


def _truncate_part(backend: Backend, cache: PrefixCache, key: str, other: str) -> None:
    path = backend.data_path(cache, key)
    blob = backend.fs.cat_file(path)
    backend.fs.pipe_file(path, blob[: len(blob) // 2])


def _flip_byte(backend: Backend, cache: PrefixCache, key: str, other: str) -> None:
    path = backend.data_path(cache, key)
    blob = bytearray(backend.fs.cat_file(path))
    blob[len(blob) - 7] ^= 0x01  # in the array body: the header still parses
    backend.fs.pipe_file(path, bytes(blob))


def _foreign_manifest(backend: Backend, cache: PrefixCache, key: str, other: str) -> None:
    backend.fs.pipe_file(
        f"{backend.entry(key)}/manifest.json",
        backend.fs.cat_file(f"{backend.entry(other)}/manifest.json"),
    )


def _raw_manifest(raw: bytes) -> Callable[..., None]:
    def tamper(backend: Backend, cache: PrefixCache, key: str, other: str) -> None:
        backend.fs.pipe_file(f"{backend.entry(key)}/manifest.json", raw)

    return tamper


def _set_params(doc: dict[str, Any]) -> None:
    doc["meta"]["params"][1]["scale"] = 99.0  # "key" stays: the params no longer produce it


def _set_format(doc: dict[str, Any]) -> None:
    doc["format"] = 2


def _unsafe_part(doc: dict[str, Any]) -> None:
    doc["files"][0]["name"] = "../../../../escape"


def _unsafe_data_dir(doc: dict[str, Any]) -> None:
    doc["data_dir"] = "d-x/../.."


def _short_costs(doc: dict[str, Any]) -> None:
    doc["meta"]["compute_seconds"] = [0.5]


TAMPERS = {
    "missing_part": _remove_part,
    "truncated_part": _truncate_part,
    "flipped_byte": _flip_byte,
    "manifest_of_other_key": _foreign_manifest,
    "params_do_not_produce_key": _rewrite_manifest(_set_params),
    "garbage_manifest": _raw_manifest(b"\x00\xffnot json at all{"),
    "empty_manifest": _raw_manifest(b""),
    "manifest_is_a_list": _raw_manifest(b"[1, 2, 3]"),
    "wrong_format": _rewrite_manifest(_set_format),
    "unsafe_part_name": _rewrite_manifest(_unsafe_part),
    "unsafe_data_dir": _rewrite_manifest(_unsafe_data_dir),
    "cost_list_too_short": _rewrite_manifest(_short_costs),
}


@pytest.mark.parametrize("tamper", list(TAMPERS), ids=list(TAMPERS))
def test_broken_entries_are_misses_removed_and_logged(
    backend: Backend, tamper: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cache = backend.cache()
    key, meta = entry_for(0)
    other, other_meta = entry_for(1)
    cache.store(key, value_for(0), meta)
    cache.store(other, value_for(1), other_meta)

    TAMPERS[tamper](backend, cache, key, other)

    with pytest.raises(CacheIntegrityError, match=key[:16]):
        cache.verify(key)
    assert cache.contains(key)  # verify() reports; it does not drop

    reader = backend.cache()  # a fresh process's view
    assert reader.load(key, workdir=tmp_path / "w") is None
    assert warnings_about(caplog, key), caplog.text
    assert not cache.contains(key)
    assert [p for p in backend.all_files() if key in p] == []  # removed, data included
    assert reader.load(key) is None  # and stays a miss

    hit = reader.load(other)  # the other entry is untouched
    assert hit is not None
    np.testing.assert_array_equal(hit.value, value_for(1))
    assert reader.verify(other).key == other


def test_corrupted_entry_is_replaced_by_the_next_store(backend: Backend) -> None:
    cache = backend.cache()
    key, meta = entry_for(0)
    cache.store(key, value_for(0), meta)
    _flip_byte(backend, cache, key, key)
    assert cache.load(key) is None
    assert cache.store(key, value_for(0), meta).published
    hit = cache.load(key)
    assert hit is not None
    np.testing.assert_array_equal(hit.value, value_for(0))


def test_verify_without_an_entry(backend: Backend) -> None:
    with pytest.raises(CacheIntegrityError, match="no entry"):
        backend.cache().verify(entry_for(0)[0])


# ------------------------------------------------------ 4. budget and LRU
def _entry_bytes(backend: Backend) -> int:
    probe = backend.cache()
    key, meta = entry_for(99)
    probe.store(key, value_for(99), meta)
    (entry,) = probe.entries()
    probe.delete(key)
    return entry.bytes


def test_lru_eviction_keeps_the_recently_loaded_entry(backend: Backend) -> None:
    size = _entry_bytes(backend)
    cache = backend.cache(byte_budget=size * 5 // 2, touch_interval=0)  # room for two
    (a, meta_a), (b, meta_b), (c, meta_c) = entry_for(0), entry_for(1), entry_for(2)
    cache.store(a, value_for(0), meta_a)
    cache.store(b, value_for(1), meta_b)
    if backend.name == "local":
        backend.age(a, 100)
        backend.age(b, 50)
    else:
        time.sleep(1.1)  # S3 LastModified has whole seconds: give the load a later one
    # a was stored first, but loaded last: b is now the least recently used.
    assert cache.load(a) is not None
    cache.store(c, value_for(2), meta_c)
    assert cache.contains(a) and cache.contains(c)
    assert not cache.contains(b)
    assert cache.stats()["bytes"] <= cache.byte_budget


def test_touch_interval_throttles_last_use_updates(local: Backend) -> None:
    cache = local.cache(touch_interval=3600)
    key, meta = entry_for(0)
    cache.store(key, value_for(), meta)
    assert cache.load(key) is not None  # first load of this process: marks the use
    local.age(key, 100)
    assert cache.load(key) is not None  # within touch_interval: no update
    used = os.stat(f"{local.entry(key)}/used").st_mtime
    assert used < time.time() - 90
    eager = local.cache(touch_interval=0)
    assert eager.load(key) is not None
    assert os.stat(f"{local.entry(key)}/used").st_mtime > time.time() - 10


def test_pinned_entries_are_never_evicted(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    size = _entry_bytes(backend)
    cache = backend.cache(byte_budget=size * 5 // 2, touch_interval=0)
    (a, meta_a), (b, meta_b), (c, meta_c) = entry_for(0), entry_for(1), entry_for(2)
    cache.store(a, value_for(0), meta_a)
    cache.pin(a)
    cache.store(b, value_for(1), meta_b)
    cache.store(c, value_for(2), meta_c)
    # a is the least recently used, but pinned: b goes instead.
    assert cache.contains(a) and cache.contains(c) and not cache.contains(b)
    assert cache.pinned() == {a}
    assert cache.stats()["pinned"] == 1

    cache.pin(c)
    caplog.clear()
    assert cache.evict(target_bytes=0) == []
    assert cache.contains(a) and cache.contains(c)
    assert any(
        "over its budget" in r.getMessage() and "pinned" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )

    cache.unpin(a)
    assert cache.pinned() == {c}
    assert cache.evict(target_bytes=0) == [a]
    assert not cache.contains(a) and cache.contains(c)
    cache.unpin(c)
    assert cache.evict(target_bytes=0) == [c]
    assert cache.entries() == []


def test_evict_to_target_bytes_goes_oldest_first(local: Backend) -> None:
    cache = local.cache(touch_interval=0)
    keys = []
    for i in range(4):
        key, meta = entry_for(i)
        cache.store(key, value_for(i), meta)
        local.age(key, 100 - 10 * i)  # entry 0 is the oldest
        keys.append(key)
    size = max(e.bytes for e in cache.entries())
    assert cache.evict(target_bytes=2 * size + size // 2) == keys[:2]
    assert cache.evict() == []  # no byte_budget: nothing to do
    assert sorted(e.key for e in cache.entries()) == sorted(keys[2:])


def test_clear_removes_entries_and_pins(backend: Backend) -> None:
    cache = backend.cache()
    for i in range(2):
        key, meta = entry_for(i)
        cache.store(key, value_for(i), meta)
        cache.pin(key)
    cache.clear()
    assert cache.entries() == [] and cache.pinned() == set()


# --------------------------------------------------------- 6. path safety
BAD_KEYS = [
    "../../etc",
    "a/b",
    "",
    "..",
    "/" + "0" * 63,
    "A" * 64,
    "0" * 63,
    "0" * 65,
    "0" * 63 + "/",
    None,
    123,
]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_malformed_keys_are_rejected_before_storage_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: Any
) -> None:
    cache = PrefixCache(tmp_path / "cache")

    def no_storage(self: FsStore) -> None:
        raise AssertionError("storage was opened for a malformed key")

    monkeypatch.setattr(FsStore, "_open_fs", no_storage)
    _, meta = entry_for(0)
    for call in (
        cache.load,
        cache.contains,
        cache.manifest,
        cache.verify,
        cache.delete,
        cache.pin,
        cache.unpin,
    ):
        with pytest.raises(PrefixKeyError):
            call(bad)
    with pytest.raises(PrefixKeyError):
        cache.store(bad, value_for(), meta)
    assert list(tmp_path.iterdir()) == []


HOSTILE = {
    "path": "../../outside",
    "abs": "/etc/passwd",
    "win": "..\\..\\outside",
    "nul": "a\x00b",
    "nested": {"../x": ["../../y", {"..": "/z"}]},
}


def test_hostile_hyperparameters_stay_inside_the_root(backend: Backend, tmp_path: Path) -> None:
    cache = backend.cache()
    meta = EntryMeta(
        pipeline="../../pipeline",
        stage_names=["../stage", "/abs/stage"],
        stage_versions=["../1", "2"],
        params=[dict(HOSTILE), {"out": "../../outside/file.txt"}],
        compute_seconds=[1.0, 2.0],
    )
    key = meta.expected_key()
    cache.store(key, value_for(), meta)
    cache.pin(key)
    hit = cache.load(key, workdir=tmp_path / "restore")
    assert hit is not None and hit.manifest.meta.params[0] == HOSTILE
    cache.gc(older_than=0)
    files = backend.all_files()
    assert files
    root = backend.root.rstrip("/") + "/"
    assert all(f.startswith(root) for f in files), files
    if backend.name == "local":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "restore"]
        assert list((tmp_path / "restore").iterdir()) == []  # arrays restore no files


# ---------------------------------------------------------- 8. pickling
def test_cache_pickles_without_live_clients(backend: Backend) -> None:
    cache = backend.cache(byte_budget=10**9, touch_interval=0)
    key, meta = entry_for(0)
    cache.store(key, value_for(0), meta)
    assert cache.durable is not None and cache.durable._fs is not None  # a live client
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.durable is not None and clone.durable._fs is None
    assert clone.byte_budget == 10**9 and clone.url == cache.url
    hit = clone.load(key)
    assert hit is not None
    np.testing.assert_array_equal(hit.value, value_for(0))
    key1, meta1 = entry_for(1)
    assert clone.store(key1, value_for(1), meta1).published
    assert cache.contains(key1)


# ------------------------------------------------------ 9. failing writes
def test_unwritable_local_root_fails_store_clearly(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = PrefixCache(root)
    key, meta = entry_for(0)
    assert not cache.contains(key)  # opens (creates) the root
    (root / "entries").write_bytes(b"")  # not a directory: every entry write fails
    with pytest.raises(CacheStorageError, match=key[:12]) as info:
        cache.store(key, value_for(), meta)
    assert isinstance(info.value, OSError) and str(root) in str(info.value)
    assert not cache.contains(key) and cache.load(key) is None


def test_root_under_a_file_fails_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_bytes(b"")
    cache = PrefixCache(tmp_path / "blocker" / "cache")
    key, meta = entry_for(0)
    with pytest.raises(CacheStorageError, match="cannot create the cache directory"):
        cache.store(key, value_for(), meta)


# ----------------------------------------------------- 10. invalid options
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"byte_budget": -1}, "-1"),
        ({"byte_budget": 0}, "0"),
        ({"byte_budget": "1GB"}, "'1GB'"),
        ({"byte_budget": 1.5e9}, "1500000000.0"),
        ({"byte_budget": True}, "True"),
        ({"object_store_budget": -5}, "-5"),
        ({"touch_interval": -1}, "-1"),
        ({"touch_interval": "often"}, "'often'"),
        ({"object_store": ""}, "''"),
        ({"storage_options": "key=abc"}, "str"),
    ],
)
def test_invalid_options_are_refused(tmp_path: Path, kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(CacheConfigError) as info:
        PrefixCache(tmp_path / "cache", **kwargs)
    assert named in str(info.value)


@pytest.mark.parametrize("url", ["nosuch://x", "nosuch://bucket/prefix", "s3x://b"])
def test_unknown_url_scheme_fails_at_construction(url: str) -> None:
    scheme = url.split("://", maxsplit=1)[0]
    with pytest.raises(CacheConfigError, match=f"unknown scheme '{scheme}'") as info:
        PrefixCache(url)
    assert url in str(info.value)


@pytest.mark.parametrize("url", ["", 123, b"/tmp/x"])
def test_bad_url_types_are_refused(url: Any) -> None:
    with pytest.raises(CacheConfigError):
        PrefixCache(url)


def test_invalid_maintenance_arguments(tmp_path: Path) -> None:
    cache = PrefixCache(tmp_path / "cache")
    with pytest.raises(CacheConfigError, match="-1"):
        cache.evict(target_bytes=-1)
    with pytest.raises(CacheConfigError, match="'10MB'"):
        cache.evict(target_bytes="10MB")  # type: ignore[arg-type]
    with pytest.raises(CacheConfigError, match="-3"):
        cache.gc(older_than=-3)
