"""Codecs: exact round trips, directly and through a real local PrefixCache."""

from __future__ import annotations

import collections
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from eeipu_ray.cache import PrefixCache
from eeipu_ray.cache.codecs import (
    ArrowCodec,
    Codec,
    CodecRegistry,
    Encoded,
    NumpyCodec,
    PathCodec,
    check_part_name,
    iter_blobs,
    part_size,
)
from eeipu_ray.cache.manifest import EntryMeta
from eeipu_ray.errors import CodecError


# ---------------------------------------------------------------- helpers
def joined_parts(enc: Encoded) -> dict[str, bytes]:
    """One bytes buffer per part, as the storage writes them."""
    return {
        name: b"".join(bytes(memoryview(blob)) for blob in iter_blobs(data))
        for name, data in enc.parts.items()
    }


def roundtrip(value: Any, workdir: Path, registry: CodecRegistry | None = None):
    registry = registry or CodecRegistry()
    enc = registry.encode(value, stage="s")
    parts = joined_parts(enc)
    assert {n: len(b) for n, b in parts.items()} == {n: part_size(d) for n, d in enc.parts.items()}
    # meta must survive the JSON manifest
    meta = json.loads(json.dumps(enc.meta))
    return registry.decode(enc.codec, parts, meta, workdir), enc


def through_cache(cache: PrefixCache, value: Any, workdir: Path, stage: str = "s"):
    meta = EntryMeta(
        pipeline="codec-tests",
        stage_names=[stage],
        stage_versions=["1"],
        params=[{"case": uuid.uuid4().hex}],
        compute_seconds=[0.25],
    )
    key = meta.expected_key()
    stored = cache.store(key, value, meta)
    assert stored.published
    hit = cache.load(key, workdir=workdir)
    assert hit is not None, "stored entry did not load back"
    assert list(hit.manifest.meta.compute_seconds) == [0.25]
    return hit, stored, key


@pytest.fixture
def cache(tmp_path) -> PrefixCache:
    return PrefixCache(str(tmp_path / "cache"))


@pytest.fixture
def workdir(tmp_path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def assert_tensor_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


def assert_ndarray_identical(a: np.ndarray, b: np.ndarray) -> None:
    assert type(b) is np.ndarray
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ arrow
def arrow_table() -> pa.Table:
    schema = pa.schema(
        [("id", pa.int64()), ("name", pa.string()), ("x", pa.float32())],
        metadata={b"origin": b"unit-test"},
    )
    first = pa.record_batch([[1, 2], ["a", "ü"], [0.5, None]], schema=schema)
    second = pa.record_batch([[3], ["c"], [1.5]], schema=schema)
    return pa.Table.from_batches([first, second])  # two chunks


@pytest.mark.parametrize("fmt", ["ipc", "parquet"])
def test_arrow_table_and_batch(fmt, workdir, tmp_path):
    registry = CodecRegistry([ArrowCodec(format=fmt)])
    table = arrow_table()
    out, enc = roundtrip(table, workdir, registry)
    assert enc.codec == "arrow" and enc.meta["format"] == fmt
    assert isinstance(out, pa.Table) and out.equals(table)
    if fmt == "ipc":
        assert out.schema.metadata[b"origin"] == b"unit-test"

    batch = table.combine_chunks().to_batches()[0]
    out, _ = roundtrip(batch, workdir, registry)
    assert isinstance(out, pa.RecordBatch) and out.equals(batch)

    empty = pa.RecordBatch.from_pylist([], schema=table.schema)
    out, _ = roundtrip(empty, workdir, registry)
    assert isinstance(out, pa.RecordBatch) and out.num_rows == 0
    assert out.schema.equals(table.schema, check_metadata=False)

    # the default registry reads what the parquet one wrote (format is in meta)
    cache = PrefixCache(str(tmp_path / "cache"), codecs=[ArrowCodec(format=fmt)])
    hit, _, key = through_cache(cache, table, workdir)
    assert hit.value.equals(table) and hit.manifest.codec_meta["format"] == fmt
    plain = PrefixCache(str(tmp_path / "cache")).load(key, workdir=workdir)
    assert plain is not None and plain.value.equals(table)


def test_arrow_codec_format_validated():
    with pytest.raises(ValueError, match=r"'ipc' or 'parquet'"):
        ArrowCodec(format="csv")


# ----------------------------------------------------------------- pandas
@pytest.mark.parametrize(
    "frame",
    [
        pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}, index=[10, 20, 30]),
        pd.DataFrame({"v": [0.5, np.nan]}, index=pd.Index(["r1", "r2"], name="row")),
        pd.DataFrame(
            {"v": [1, 2]},
            index=pd.MultiIndex.from_tuples([(1, "a"), (2, "b")], names=["i", "j"]),
        ),
        pd.DataFrame(
            {
                "when": pd.to_datetime(["2024-01-01", "2024-06-30"]),
                "cat": pd.Categorical(["lo", "hi"]),
                "flag": [True, False],
            },
            index=pd.RangeIndex(5, 9, 2),
        ),
        pd.DataFrame({0: [1.0], 1: [2.0]}),
    ],
    ids=["int-index", "named-str-index", "multiindex", "dtypes-rangeindex", "int-columns"],
)
def test_pandas_round_trip(frame, workdir, cache):
    out, enc = roundtrip(frame, workdir)
    assert enc.codec == "pandas"
    pd.testing.assert_frame_equal(out, frame)
    hit, _, _ = through_cache(cache, frame, workdir)
    pd.testing.assert_frame_equal(hit.value, frame)


@pytest.mark.parametrize(
    "frame, culprit",
    [
        (pd.DataFrame([[1, 2]], columns=["a", "a"]), "Duplicate"),
        (pd.DataFrame({"a": [1], 0: [2]}), "mixed types"),
        (pd.DataFrame({"a": [1]}, index=pd.Index([5], name=3)), "index names"),
        (pd.DataFrame({"a": [1, "x"]}), "Arrow"),
    ],
    ids=["duplicate-columns", "mixed-column-types", "non-str-index-name", "mixed-values"],
)
def test_pandas_refuses_what_arrow_would_change(frame, culprit):
    with pytest.raises(CodecError, match=culprit) as info:
        CodecRegistry().encode(frame, stage="prep")
    assert "stage 'prep'" in str(info.value)


# ------------------------------------------------------------------ torch
@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4, dtype=torch.float32),
        torch.randn(5, dtype=torch.float32).to(torch.bfloat16),
        torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        torch.tensor([True, False]),
        torch.randn(2, 2).half(),
        torch.tensor(3.5),
        torch.empty(0, 3),
        torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous view
    ],
    ids=["float32", "bfloat16", "int64", "bool", "float16", "0-d", "empty", "transposed"],
)
def test_torch_tensor_round_trip(tensor, workdir, cache):
    out, enc = roundtrip(tensor, workdir)
    assert enc.codec == "torch"
    assert_tensor_identical(tensor, out)
    hit, _, _ = through_cache(cache, tensor, workdir)
    assert_tensor_identical(tensor, hit.value)


def test_tensor_with_grad_is_detached(workdir):
    param = torch.nn.Parameter(torch.ones(2, 2))
    out, _ = roundtrip(param, workdir)
    assert not out.requires_grad and torch.equal(out, torch.ones(2, 2))


def test_state_dict_with_tied_weights(workdir, cache):
    shared = torch.randn(64, 32)
    tied = {"encoder.embed": shared, "bias": torch.randn(32), "decoder.embed": shared}
    untied = {"encoder.embed": shared, "bias": torch.randn(32), "decoder.embed": shared.clone()}

    out, enc = roundtrip(tied, workdir)
    assert enc.codec == "torch"
    assert list(out) == list(tied)  # order kept
    for name, tensor in tied.items():
        assert_tensor_identical(tensor, out[name])
    assert out["encoder.embed"] is out["decoder.embed"] or (
        out["encoder.embed"].untyped_storage().data_ptr()
        == out["decoder.embed"].untyped_storage().data_ptr()
    )
    _, enc_untied = roundtrip(untied, workdir)
    tied_size = part_size(enc.parts["data"])
    untied_size = part_size(enc_untied.parts["data"])
    # the shared tensor is stored once: the tied entry is smaller by about one copy
    assert untied_size - tied_size >= shared.nelement() * shared.element_size() * 0.95

    hit, stored, _ = through_cache(cache, tied, workdir)
    assert hit.value["encoder.embed"] is hit.value["decoder.embed"] or (
        hit.value["encoder.embed"].untyped_storage().data_ptr()
        == hit.value["decoder.embed"].untyped_storage().data_ptr()
    )
    assert stored.bytes < untied_size


def test_state_dict_order_kept_across_dtypes(workdir):
    sd = {
        "z": torch.zeros(2, dtype=torch.int8),
        "m": torch.zeros(3, dtype=torch.float64),
        "a": torch.ones(2, dtype=torch.bfloat16),
    }
    out, _ = roundtrip(sd, workdir)
    assert list(out) == ["z", "m", "a"]


def test_torch_linear_state_dict(workdir, cache):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    state = model.state_dict()
    hit, _, _ = through_cache(cache, state, workdir)
    assert list(hit.value) == list(state)
    fresh = torch.nn.Linear(8, 3)
    fresh.load_state_dict(hit.value)
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), model(x))


def test_sparse_tensor_refused(workdir):
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(CodecError, match=r"dense"):
        CodecRegistry().encode({"w": sparse}, stage="s")


# ------------------------------------------------------------------ numpy
@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        np.array(3.25),
        np.zeros((0, 3), dtype=np.float32),
        np.zeros((2, 0, 4), dtype=np.int16, order="F"),
        np.array(
            [(1, 2.5, b"ab"), (3, -1.0, b"cd")], dtype=[("i", "<i4"), ("f", "<f8"), ("s", "S2")]
        ),
        np.arange(6, dtype=">f8").reshape(2, 3),
        np.array(["2024-01-01", "2024-03-01"], dtype="datetime64[D]"),
        np.array([1, 2], dtype="timedelta64[s]"),
        np.array([1 + 2j, -3j], dtype=np.complex128),
        np.array([True, False, True]),
        np.array(["ab", "üé"]),
        np.arange(20, dtype=np.uint8)[::3],  # non-contiguous
    ],
    ids=[
        "c-order",
        "f-order",
        "0-d",
        "empty",
        "empty-f",
        "structured",
        "big-endian",
        "datetime64",
        "timedelta64",
        "complex",
        "bool",
        "unicode",
        "strided",
    ],
)
def test_numpy_round_trip(array, workdir, cache):
    out, enc = roundtrip(array, workdir)
    assert enc.codec == "numpy"
    assert_ndarray_identical(array, out)
    if array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous:
        assert out.flags.f_contiguous
    hit, _, _ = through_cache(cache, array, workdir)
    assert_ndarray_identical(array, hit.value)
    # as writable as the array the stage returned (the cache memory-maps parts)
    assert out.flags.writeable and hit.value.flags.writeable


def test_numpy_parts_are_not_copied_on_encode():
    array = np.arange(1000, dtype=np.float64)
    enc = CodecRegistry().encode(array)
    _header, body = iter_blobs(enc.parts["data"])
    assert memoryview(body).nbytes == array.nbytes
    assert np.shares_memory(np.frombuffer(body, dtype=np.uint8), array)


@pytest.mark.parametrize("scalar", [np.float64(0.1), np.float32(2.5), np.int64(-4), np.bool_(True)])
def test_numpy_scalars(scalar, workdir):
    out, enc = roundtrip(scalar, workdir)
    assert enc.codec == "numpy"
    assert type(out) is type(scalar) and out == scalar


def test_object_and_masked_arrays_not_matched_by_numpy():
    obj = np.array([{"a": 1}, None], dtype=object)
    assert not NumpyCodec().matches(obj)
    with pytest.raises(CodecError, match=r"stage 'feat'"):
        CodecRegistry().encode(obj, stage="feat")
    assert CodecRegistry(allow_pickle=True).encode(obj).codec == "pickle"
    masked = np.ma.masked_array([1, 2, 3], mask=[False, True, False])
    assert not NumpyCodec().matches(masked)  # .npy would drop the mask


def test_masked_array_with_pickle_keeps_mask(workdir):
    masked = np.ma.masked_array([1, 2, 3], mask=[False, True, False])
    out, enc = roundtrip(masked, workdir, CodecRegistry(allow_pickle=True))
    assert enc.codec == "pickle"
    assert list(out.mask) == [False, True, False]


# ------------------------------------------------------------------- json
def test_json_values(workdir, cache):
    value = {
        "nested": {"list": [1, 2.5, None, True, "s"], "deep": {"x": [[], {}]}},
        "unicode": "héllo wörld ✓ 日本",
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "neg_zero": -0.0,
        "big": 2**80,
        "exact": 0.1 + 0.2,
    }
    for out in (roundtrip(value, workdir)[0], through_cache(cache, value, workdir)[0].value):
        assert math.isnan(out.pop("nan"))
        expected = dict(value)
        expected.pop("nan")
        assert out == expected
        assert math.copysign(1.0, out["neg_zero"]) == -1.0
        assert out["exact"] == 0.1 + 0.2
    assert CodecRegistry().encode(value).codec == "json"
    for scalar in (None, True, 7, 1.5, "s", [], {}):
        out, enc = roundtrip(scalar, workdir)
        assert enc.codec == "json" and out == scalar and type(out) is type(scalar)


# -------------------------------------------------------------- composite
def test_composite_tuple_of_arrays(workdir, cache):
    value = (np.arange(6).reshape(2, 3), np.array([0, 1]), "label", 3, None)
    for out in (roundtrip(value, workdir)[0], through_cache(cache, value, workdir)[0].value):
        assert type(out) is tuple and len(out) == 5
        assert_ndarray_identical(value[0], out[0])
        assert_ndarray_identical(value[1], out[1])
        assert out[2:] == ("label", 3, None)
    assert CodecRegistry().encode(value).codec == "composite"


def test_composite_mixed_dict(tmp_path, workdir, cache):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    state = torch.nn.Linear(2, 2).state_dict()
    value = {
        "model": state,
        "mean": np.array([0.5, 1.5]),
        "name": "run-1",
        "vocab": vocab,
        "table": pa.table({"a": [1, 2]}),
        "history": [(1, 0.5), (2, 0.25)],
        "scalar": np.float64(0.125),
    }
    for out in (roundtrip(value, workdir)[0], through_cache(cache, value, workdir)[0].value):
        assert list(out) == list(value)
        assert set(out["model"]) == set(state)
        for k in state:
            assert_tensor_identical(state[k], out["model"][k])
        assert_ndarray_identical(value["mean"], out["mean"])
        assert out["name"] == "run-1"
        assert out["vocab"].read_text() == "a\nb\n"
        assert out["vocab"].is_relative_to(workdir) and out["vocab"] != vocab
        assert out["table"].equals(value["table"])
        assert out["history"] == [(1, 0.5), (2, 0.25)]
        assert type(out["history"]) is list and type(out["history"][0]) is tuple
        assert type(out["scalar"]) is np.float64


def test_composite_nested_lists_keep_tuple_vs_list(workdir):
    value = [[1, (2, [3, (4,)])], (), [], [np.zeros(2), (np.ones(1),)]]
    out, enc = roundtrip(value, workdir)
    assert enc.codec == "composite"  # arrays inside: not JSON
    assert out[0] == [1, (2, [3, (4,)])]
    assert type(out[0][1]) is tuple and type(out[0][1][1]) is list
    assert out[1] == () and type(out[1]) is tuple
    assert out[2] == [] and type(out[2]) is list
    assert type(out[3][1]) is tuple
    assert_ndarray_identical(value[3][0], out[3][0])


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    "value",
    [collections.OrderedDict(a=[1]), Point(1, 2), collections.defaultdict(list, a=[1])],
    ids=["ordereddict", "namedtuple", "defaultdict"],
)
def test_container_subclasses_are_not_silently_changed(value, workdir):
    # refused without pickle (never a RecursionError nor a plain tuple/dict)
    with pytest.raises(CodecError, match=r"stage 'prep'"):
        CodecRegistry().encode(value, stage="prep")
    out, enc = roundtrip(value, workdir, CodecRegistry(allow_pickle=True))
    assert enc.codec == "pickle" and type(out) is type(value) and out == value


def test_composite_with_unstorable_leaf_names_stage():
    with pytest.raises(CodecError, match=r"stage 'feat'.*set"):
        CodecRegistry().encode((np.zeros(1), {1, 2}), stage="feat")


def test_self_referencing_list_is_a_codec_error():
    loop: list = [np.zeros(1)]
    loop.append(loop)
    with pytest.raises(CodecError, match=r"stage 'x'"):
        CodecRegistry().encode(loop, stage="x")


# ------------------------------------------------------------------- path
def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "model.bin": os.urandom(4096),
        "config with spaces.json": b'{"a": 1}',
        "sub/déjà vu.txt": "ünïcödé ✓".encode(),
        "sub/deeper/empty.dat": b"",
        "sub/deeper/日本.npy": os.urandom(100),
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "empty-dir" / "nested-empty").mkdir(parents=True)
    return files


def read_tree(root: Path) -> tuple[dict[str, bytes], set[str]]:
    files, dirs = {}, set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            dirs.add(rel)
        else:
            files[rel] = path.read_bytes()
    return files, dirs


def test_path_directory_round_trip(tmp_path, workdir, cache):
    src = tmp_path / "ckpt dir ü"
    src.mkdir()
    make_tree(src)
    expected = read_tree(src)
    for out in (roundtrip(src, workdir)[0], through_cache(cache, src, workdir)[0].value):
        assert isinstance(out, Path) and out.is_dir()
        assert out.name == src.name
        assert out.is_relative_to(workdir)
        assert read_tree(out) == expected
    # two loads never overwrite each other
    first, _ = roundtrip(src, workdir)
    second, _ = roundtrip(src, workdir)
    assert first != second and first.exists() and second.exists()


def test_path_file_round_trip(tmp_path, workdir, cache):
    src = tmp_path / "weights ✓.bin"
    data = os.urandom(10_000)
    src.write_bytes(data)
    for out in (roundtrip(src, workdir)[0], through_cache(cache, src, workdir)[0].value):
        assert out.is_file() and out.name == src.name
        assert out.is_relative_to(workdir)
        assert out.read_bytes() == data
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    out, _ = roundtrip(empty, workdir)
    assert out.read_bytes() == b""


def test_path_symlinks_refused(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("x")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with pytest.raises(CodecError, match=r"symbolic link"):
        CodecRegistry().encode(link, stage="s")

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok.txt").write_text("ok")
    (tree / "escape").symlink_to("/etc/hostname")
    with pytest.raises(CodecError, match=r"symbolic link"):
        CodecRegistry().encode(tree, stage="s")

    tree2 = tmp_path / "tree2"
    (tree2 / "real").mkdir(parents=True)
    (tree2 / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(CodecError, match=r"symbolic link"):
        CodecRegistry().encode(tree2, stage="s")


def test_path_special_and_missing_refused(tmp_path):
    with pytest.raises(CodecError, match=r"does not exist"):
        CodecRegistry().encode(tmp_path / "missing", stage="s")
    tree = tmp_path / "fifo-tree"
    tree.mkdir()
    os.mkfifo(tree / "pipe")
    with pytest.raises(CodecError, match=r"not a regular file"):
        CodecRegistry().encode(tree, stage="s")


def test_path_with_name_decode_would_refuse_is_refused_at_store(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "back\\slash.txt").write_text("x")
    with pytest.raises(CodecError, match=r"safe relative path"):
        CodecRegistry().encode(tree, stage="s")


@pytest.mark.parametrize(
    "meta",
    [
        {"kind": "file", "name": "../evil"},
        {"kind": "file", "name": "/abs/evil"},
        {"kind": "file", "name": "sub/../../evil"},
        {"kind": "file", "name": ".."},
        {"kind": "dir", "name": "ok", "dirs": [], "files": ["../../evil"]},
        {"kind": "dir", "name": "ok", "dirs": [], "files": ["/abs/evil"]},
        {"kind": "dir", "name": "ok", "dirs": ["../../evil-dir"], "files": []},
        {"kind": "dir", "name": "ok", "dirs": [], "files": ["a\\..\\..\\evil"]},
        {"kind": "dir", "name": "../evil", "dirs": [], "files": []},
    ],
)
def test_path_decode_refuses_unsafe_stored_paths(meta, tmp_path):
    outer = tmp_path / "outer"
    workdir = outer / "work"
    workdir.mkdir(parents=True)
    parts = {"file": b"pwned", "f0": b"pwned"}
    with pytest.raises(CodecError, match=r"not a safe relative path|single path component"):
        PathCodec().decode(parts, meta, workdir, CodecRegistry())
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(workdir) for p in written), written
    assert not (tmp_path / "evil").exists() and not Path("/abs/evil").exists()


# ----------------------------------------------------------------- pickle
class Custom:
    def __init__(self, payload):
        self.payload = payload

    def __eq__(self, other):
        return isinstance(other, Custom) and other.payload == self.payload

    __hash__ = None


def test_pickle_refused_by_default():
    with pytest.raises(CodecError) as info:
        CodecRegistry().encode(Custom(1), stage="train")
    msg = str(info.value)
    assert "stage 'train'" in msg and "Custom" in msg and "allow_pickle" in msg


def test_pickle_allowed(workdir, tmp_path):
    value = Custom({"a": [1, 2]})
    out, enc = roundtrip(value, workdir, CodecRegistry(allow_pickle=True))
    assert enc.codec == "pickle" and out == value

    pickling = PrefixCache(str(tmp_path / "cache"), allow_pickle=True)
    hit, _, key = through_cache(pickling, value, workdir)
    assert hit.value == value
    # a reader that does not trust pickle: a miss, and the entry is left in place
    strict = PrefixCache(str(tmp_path / "cache"))
    assert strict.load(key, workdir=workdir) is None
    assert strict.contains(key)
    assert pickling.load(key, workdir=workdir).value == value


def test_decoding_pickled_entry_without_pickle_raises(workdir):
    enc = CodecRegistry(allow_pickle=True).encode(Custom(3))
    with pytest.raises(CodecError, match=r"allow_pickle"):
        CodecRegistry().decode(enc.codec, joined_parts(enc), enc.meta, workdir)
    # also when the pickled value is a leaf of a composite
    enc = CodecRegistry(allow_pickle=True).encode((np.zeros(1), Custom(4)))
    assert enc.codec == "composite"
    with pytest.raises(CodecError, match=r"allow_pickle"):
        CodecRegistry().decode(enc.codec, joined_parts(enc), enc.meta, workdir)
    out = CodecRegistry(allow_pickle=True).decode(enc.codec, joined_parts(enc), enc.meta, workdir)
    assert out[1] == Custom(4)


def test_unpicklable_value_is_a_codec_error():
    with pytest.raises(CodecError, match=r"stage 'p'.*pickled"):
        CodecRegistry(allow_pickle=True).encode(lambda: 1, stage="p")


# ----------------------------------------------------------- custom codecs
class IntListCodec(Codec):
    """Lists of ints as little-endian int64 (and a marker to prove it ran)."""

    name = "intlist"

    def matches(self, value):
        return type(value) is list and all(type(v) is int for v in value)

    def encode(self, value, registry):
        return Encoded(self.name, {"ints": np.array(value, "<i8").tobytes()}, {"n": len(value)})

    def decode(self, parts, meta, workdir, registry):
        return ["custom", *np.frombuffer(bytes(parts["ints"]), "<i8").tolist()]


def test_custom_codec_registered_first_wins(workdir, tmp_path):
    registry = CodecRegistry([IntListCodec()])
    enc = registry.encode([1, 2, 3])
    assert enc.codec == "intlist"  # before the json codec
    assert registry.decode(enc.codec, joined_parts(enc), enc.meta, workdir) == [
        "custom",
        1,
        2,
        3,
    ]
    assert registry.encode(["a"]).codec == "json"  # not matched: built-ins still apply

    cache = PrefixCache(str(tmp_path / "cache"), codecs=[IntListCodec()])
    hit, _, key = through_cache(cache, [4, 5], workdir)
    assert hit.value == ["custom", 4, 5]
    # a reader without the codec: a miss, not a crash
    assert PrefixCache(str(tmp_path / "cache")).load(key, workdir=workdir) is None


def test_custom_codec_errors():
    class BadParts(IntListCodec):
        name = "badparts"

        def encode(self, value, registry):
            return Encoded(self.name, {"../escape": b"x"}, {})

    with pytest.raises(CodecError, match=r"part name"):
        CodecRegistry([BadParts()]).encode([1])

    class Crashes(IntListCodec):
        name = "crashes"

        def encode(self, value, registry):
            raise RuntimeError("library failure")

    with pytest.raises(CodecError, match=r"stage 'feat'.*library failure"):
        CodecRegistry([Crashes()]).encode([1], stage="feat")

    with pytest.raises(ValueError, match=r"unique"):
        CodecRegistry([IntListCodec(), IntListCodec()])
    with pytest.raises(ValueError, match=r"pickle"):

        class FakePickle(IntListCodec):
            name = "pickle"

        CodecRegistry([FakePickle()])


def test_unknown_codec_name_on_decode(workdir):
    with pytest.raises(CodecError, match=r"no codec named 'mystery'"):
        CodecRegistry().decode("mystery", {}, {}, workdir)


@pytest.mark.parametrize(
    "name", ["", "../x", "/abs", "a/../b", "a\\b", "a b", ".", "x\n", "a//b", ".hidden"]
)
def test_check_part_name_rejects(name):
    with pytest.raises(CodecError):
        check_part_name(name)


@pytest.mark.parametrize("name", ["data", "l0/data", "f12", "a.b=c+d-e_f"])
def test_check_part_name_accepts(name):
    assert check_part_name(name) == name
