"""Hugging Face ``datasets`` / ``transformers`` and Ray Data values in the prefix
cache: round trips through a local directory and the loopback S3 server,
zero-copy local loads, memoized pipeline runs, and corrupted entries."""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers

from eeipu_ray.cache import PrefixCache
from eeipu_ray.cache.codecs import CodecRegistry, default_codecs
from eeipu_ray.cache.manifest import EntryMeta
from eeipu_ray.errors import CodecError
from tests.cache.test_codecs import joined_parts, through_cache
from tests.cache.test_prefix_cache import Backend

LOGGER = "eeipu_ray.cache"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


# ----------------------------------------------------------------- values
def hf_dataset(n: int = 6) -> Any:
    from datasets import Array2D, ClassLabel, Dataset, DatasetInfo, Features, Value

    List = getattr(datasets, "List", None) or datasets.Sequence  # datasets < 4: Sequence
    features = Features(
        {
            "text": Value("string"),
            "label": ClassLabel(names=["negative", "positive"]),
            "scores": List(Value("float32")),
            "id": Value("int32"),
            "grid": Array2D(shape=(2, 2), dtype="int16"),
        }
    )
    return Dataset.from_dict(
        {
            "text": [f"example {i} ü" for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "scores": [[i / 4] * (i % 3) for i in range(n)],
            "id": list(range(n)),
            "grid": [[[i, -i], [2 * i, 0]] for i in range(n)],
        },
        info=DatasetInfo(description="codec test rows", license="cc0", features=features),
        split="train",
    )


def assert_same_dataset(loaded: Any, original: Any) -> None:
    from datasets import Dataset

    assert type(loaded) is Dataset
    assert loaded.features == original.features
    assert loaded.num_rows == original.num_rows
    assert loaded.format == original.format
    assert loaded.split == original.split
    assert loaded.info.description == original.info.description
    # Unformatted rows: exact values (the float32 scores included).
    assert loaded.with_format(None)[:] == original.with_format(None)[:]


def tiny_t5(seed: int = 0) -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=260,  # ByT5's 256 bytes and its 3 special tokens
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_heads=2,
        num_layers=1,
        num_decoder_layers=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def assert_same_model(loaded: Any, original: Any) -> None:
    assert type(loaded) is type(original)
    assert loaded.training == original.training
    assert loaded.dtype == original.dtype
    assert loaded.config.to_diff_dict() | {"_name_or_path": ""} == (
        original.config.to_diff_dict() | {"_name_or_path": ""}
    )
    want, got = original.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert {n for n, p in loaded.named_parameters() if not p.requires_grad} == {
        n for n, p in original.named_parameters() if not p.requires_grad
    }


TEXTS = ["hello world", "Grüße, 世界!", ""]


def assert_same_tokenizer(loaded: Any, original: Any) -> None:
    assert type(loaded) is type(original)
    assert loaded(TEXTS)["input_ids"] == original(TEXTS)["input_ids"]
    assert loaded.all_special_tokens == original.all_special_tokens
    ids = original("round trip")["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == "round trip"


def store(cache: PrefixCache, value: Any, stage: str = "s") -> str:
    meta = EntryMeta(
        pipeline="hf-codec-tests",
        stage_names=[stage],
        stage_versions=["1"],
        params=[{"case": uuid.uuid4().hex}],
        compute_seconds=[0.5],
    )
    key = meta.expected_key()
    assert cache.store(key, value, meta).published
    return key


# ------------------------------------------------------------- registry
def test_library_codecs_come_first_and_pickle_last() -> None:
    names = [c.name for c in default_codecs()]
    assert names[:4] == ["hf_dataset", "hf_pretrained", "ray_dataset", "arrow"]
    assert "pickle" not in names
    registry = CodecRegistry(allow_pickle=True)
    assert registry.codecs[-1].name == "pickle"
    # A more generic codec (or pickle) never catches these values first.
    assert registry.encode(hf_dataset(), stage="s").codec == "hf_dataset"
    dd = datasets.DatasetDict({"train": hf_dataset()})
    assert registry.encode(dd, stage="s").codec == "hf_dataset"
    assert registry.encode(transformers.ByT5Tokenizer(), stage="s").codec == "hf_pretrained"


def test_core_codecs_import_none_of_the_libraries() -> None:
    code = (
        "import sys, numpy as np\n"
        "from eeipu_ray.cache.codecs import CodecRegistry\n"
        "registry = CodecRegistry()\n"
        "registry.encode({'x': np.arange(3), 'note': 'n', 'pair': (1, 2.0)}, stage='s')\n"
        "print(sorted(m for m in ('datasets', 'transformers', 'ray.data') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stderr


# ----------------------------------------------------------- hf datasets
def test_hf_dataset_round_trip(backend: Backend, workdir: Path) -> None:
    ds = hf_dataset()
    hit, _, _ = through_cache(backend.cache(), ds, workdir)
    assert hit.manifest.codec == "hf_dataset"
    assert_same_dataset(hit.value, ds)
    assert hit.value.features["label"].names == ["negative", "positive"]
    assert hit.value.info.license == "cc0"
    assert hit.value._fingerprint == ds._fingerprint
    # Still a working dataset: the library's own transforms run on it.
    doubled = hit.value.map(lambda row: {"id2": row["id"] * 2})
    assert doubled["id2"] == [2 * i for i in range(6)]


def test_hf_dataset_dict_keeps_split_names_and_order(backend: Backend, workdir: Path) -> None:
    full = hf_dataset(9)
    dd = datasets.DatasetDict(
        {
            "validation": full.select(range(6, 9)),
            datasets.Split.TRAIN: full.select(range(6)),
            "test.2026": full.select([]),  # an empty split with a dotted name
        }
    )
    hit, _, _ = through_cache(backend.cache(), dd, workdir)
    loaded = hit.value
    assert type(loaded) is datasets.DatasetDict
    assert list(loaded) == ["validation", "train", "test.2026"]
    for name, split in zip(loaded, dd.values(), strict=True):
        assert_same_dataset(loaded[name], split)
    assert loaded["test.2026"].num_rows == 0
    assert loaded["test.2026"].features == full.features


def test_hf_dataset_selected_rows_and_format_kept(workdir: Path, tmp_path: Path) -> None:
    ds = (
        hf_dataset(40)
        .shuffle(seed=3)
        .filter(lambda row: row["id"] % 3 != 0)
        .select(range(10))
        .with_format("numpy", columns=["id", "label"], output_all_columns=True)
    )
    enc = CodecRegistry().encode(ds, stage="s")
    hit, _, _ = through_cache(PrefixCache(str(tmp_path / "cache")), ds, workdir)
    assert_same_dataset(hit.value, ds)
    np.testing.assert_array_equal(hit.value[:]["id"], ds[:]["id"])
    # Only the ten selected rows were written, not the 40 underneath.
    stream = pa.ipc.open_stream(joined_parts(enc)["data"]).read_all()
    assert stream.num_rows == 10


def test_hf_dataset_local_load_is_memory_mapped(tmp_path: Path, workdir: Path) -> None:
    from datasets import Dataset

    n = 200_000
    ds = Dataset.from_dict({"x": np.arange(n, dtype=np.float64), "y": np.ones(n, np.int32)})
    cache = PrefixCache(str(tmp_path / "cache"))
    key = store(cache, ds)
    manifest = cache.manifest(key)
    assert manifest is not None
    entry_data = tmp_path / "cache" / "entries" / key / manifest.data_dir

    allocated = pa.total_allocated_bytes()
    hit = cache.load(key, workdir=workdir)
    assert hit is not None
    # No copy of the 2.4 MB of columns: nothing was allocated for them ...
    assert pa.total_allocated_bytes() - allocated < n // 10
    table = hit.value.data.table
    np.testing.assert_array_equal(hit.value.with_format("numpy")[:]["x"], np.arange(n))
    if not os.path.exists("/proc/self/maps"):
        return
    # ... and every column buffer lies in a mapping of the entry's own file.
    mapped = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().startswith(str(entry_data)):
                low, high = (int(x, 16) for x in fields[0].split("-"))
                mapped.append((low, high))
    buffers = [
        buf
        for column in table.columns
        for chunk in column.chunks
        for buf in chunk.buffers()
        if buf is not None and buf.size > 0
    ]
    assert mapped and buffers
    for buf in buffers:
        assert any(low <= buf.address and buf.address + buf.size <= high for low, high in mapped)


def test_hf_dataset_refuses_what_would_not_come_back() -> None:
    registry = CodecRegistry()
    ds = hf_dataset()
    with pytest.raises(CodecError, match=r"stage 'prep'.*format argument 'dtype'"):
        registry.encode(ds.with_format("numpy", dtype=np.float16), stage="prep")
    with pytest.raises(CodecError, match=r"DatasetDict key 0 .*use str keys"):
        registry.encode(datasets.DatasetDict({0: ds}), stage="prep")
    streamed = datasets.DatasetDict({"train": ds.to_iterable_dataset()})
    with pytest.raises(CodecError, match="split 'train' holds a IterableDataset"):
        registry.encode(streamed, stage="prep")


# ---------------------------------------------------------- transformers
def test_model_and_tokenizer_round_trip(backend: Backend, workdir: Path) -> None:
    model = tiny_t5()
    model.encoder.block[0].requires_grad_(False)  # partly frozen, in train mode
    tokenizer = transformers.ByT5Tokenizer()
    hit, _, _ = through_cache(backend.cache(), {"model": model, "tokenizer": tokenizer}, workdir)
    assert hit.manifest.codec == "composite"
    assert_same_model(hit.value["model"], model)
    assert_same_tokenizer(hit.value["tokenizer"], tokenizer)
    # The restored files live under the work directory given to load().
    assert Path(hit.value["model"].name_or_path).is_relative_to(workdir)


def test_model_dtype_and_eval_mode_kept(
    tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model = tiny_t5(1).to(torch.bfloat16).eval()
    hit, _, _ = through_cache(PrefixCache(str(tmp_path / "cache")), model, workdir)
    assert hit.manifest.codec == "hf_pretrained"
    assert hit.value.dtype == torch.bfloat16
    assert_same_model(hit.value, model)
    # The save_pretrained files written for the store are gone once it is done.
    assert list(scratch.iterdir()) == []


class _Scratch:
    pass


def test_pretrained_class_must_be_found_by_name(tmp_path: Path, workdir: Path) -> None:
    from transformers import T5ForConditionalGeneration

    class LocalT5(T5ForConditionalGeneration):  # not importable by its name
        pass

    registry = CodecRegistry()
    with pytest.raises(CodecError, match=r"stage 'init'.*LocalT5 cannot be found again"):
        registry.encode(LocalT5(tiny_t5().config), stage="init")

    # An entry naming a module this process has not imported is not imported.
    enc = registry.encode(transformers.ByT5Tokenizer(), stage="init")
    meta = json.loads(json.dumps(enc.meta))
    meta["class"] = {"module": "some_plugin.models", "qualname": "Tokenizer"}
    with pytest.raises(CodecError, match=r"'some_plugin\.models' is not imported"):
        registry.decode(enc.codec, joined_parts(enc), meta, workdir)
    assert "some_plugin" not in sys.modules
    # Nor is a class that is not a tokenizer accepted.
    meta["class"] = {"module": __name__, "qualname": "_Scratch"}
    with pytest.raises(CodecError, match="_Scratch is not a PreTrainedTokenizerBase"):
        registry.decode(enc.codec, joined_parts(enc), meta, workdir)


# A fixed batch for the scoring stage: the loss of the same weights is the same.
INPUT_IDS = torch.tensor([[10, 11, 12, 1], [20, 21, 1, 0]])
LABELS = torch.tensor([[13, 14, 1], [22, 1, -100]])


@pytest.mark.parametrize("returns", ["model", "save_pretrained_path"])
def test_pipeline_second_run_loads_the_cached_model(returns: str, tmp_path: Path) -> None:
    from ray import tune
    from transformers import T5ForConditionalGeneration

    from eeipu_ray.pipeline import Pipeline, Stage

    calls: collections.Counter[str] = collections.Counter()
    received: list[Any] = []

    def init(inputs, params, ctx):
        calls["init"] += 1
        model = tiny_t5(params["seed"])
        if returns == "model":
            return model
        path = ctx.trial_dir / "t5"
        model.save_pretrained(path)
        return path

    def score(inputs, params):
        calls["score"] += 1
        # A path's files are listed now: the trial's directory goes after the run.
        received.append(inputs if returns == "model" else sorted(p.name for p in inputs.iterdir()))
        model = (
            inputs
            if returns == "model"
            else T5ForConditionalGeneration.from_pretrained(inputs, local_files_only=True)
        )
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=INPUT_IDS, labels=LABELS).loss
        return {"score": float(loss) * params["scale"]}

    pipeline = Pipeline(
        "t5-codec",
        [
            Stage("init", init, {"seed": tune.randint(0, 10)}),
            Stage("score", score, {"scale": tune.uniform(0.5, 2.0)}),
        ],
    )
    cache = PrefixCache(str(tmp_path / "cache"))
    config = {"init": {"seed": 3}, "score": {"scale": 1.0}}
    first = pipeline.run(config, cache, meter=None)
    second = pipeline.run({"init": {"seed": 3}, "score": {"scale": 2.0}}, cache, meter=None)
    assert calls == {"init": 1, "score": 2}
    assert second.memoized_stages == 1
    assert [s.status for s in second.stages] == ["loaded", "executed"]
    assert cache.manifest(second.stages[0].prefix_key).codec == (
        "hf_pretrained" if returns == "model" else "path"
    )
    assert second.output["score"] == pytest.approx(2.0 * first.output["score"], rel=1e-6)
    if returns == "model":
        assert isinstance(received[1], T5ForConditionalGeneration)
        assert_same_model(received[1], received[0])
    else:
        assert received[1] == received[0]
        assert {"config.json", "model.safetensors"} <= set(received[1])


# --------------------------------------------------------------- ray data
@pytest.fixture
def ray_data(ray_local: Any) -> Any:
    import ray.data

    return ray.data


def ray_dataset(ray_data: Any) -> Any:
    rows = [
        {"id": i, "name": f"row-{i}", "x": i / 8, "vec": np.arange(3, dtype=np.float32) * i}
        for i in range(12)
    ]
    return ray_data.from_items(rows, override_num_blocks=3)


def assert_same_ray_dataset(loaded: Any, original: Any) -> None:
    assert loaded.count() == original.count()
    assert loaded.schema().base_schema == original.schema().base_schema
    got, want = loaded.take_all(), original.take_all()
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for a, b in zip(got, want, strict=True):
        assert {k: v for k, v in a.items() if k != "vec"} == {
            k: v for k, v in b.items() if k != "vec"
        }
        np.testing.assert_array_equal(a["vec"], b["vec"])


def test_ray_dataset_round_trip(ray_data: Any, backend: Backend, workdir: Path) -> None:
    ds = ray_dataset(ray_data).materialize()
    hit, _, _ = through_cache(backend.cache(), ds, workdir)
    assert hit.manifest.codec == "ray_dataset"
    assert [f.name for f in hit.manifest.files] == [f"block-{i:05d}.parquet" for i in range(3)]
    assert isinstance(hit.value, ray_data.Dataset)
    assert hit.value.num_blocks() == 3
    assert_same_ray_dataset(hit.value, ds)


def test_lazy_and_empty_ray_datasets(ray_data: Any, tmp_path: Path, workdir: Path) -> None:
    cache = PrefixCache(str(tmp_path / "cache"))
    lazy = ray_dataset(ray_data).map(lambda row: {**row, "x": row["x"] * 2})
    hit, _, _ = through_cache(cache, lazy, workdir)
    assert_same_ray_dataset(hit.value, lazy)
    from ray.data.expressions import col

    empty = ray_dataset(ray_data).filter(expr=col("id") > 100).materialize()
    hit, _, _ = through_cache(cache, empty, workdir)
    assert hit.value.count() == 0
    assert hit.value.schema().base_schema == empty.schema().base_schema


# ------------------------------------------------------- corrupted entries
def _model_and_tokenizer(_: Any) -> Any:
    return {"model": tiny_t5(), "tokenizer": transformers.ByT5Tokenizer()}


def _dataset_dict(_: Any) -> Any:
    return datasets.DatasetDict({"train": hf_dataset(), "test": hf_dataset(2)})


def _ray_dataset(ray_data: Any) -> Any:
    return ray_dataset(ray_data).materialize()


VALUES = {
    "hf_dataset": lambda _: hf_dataset(),
    "hf_dataset_dict": _dataset_dict,
    "hf_pretrained": _model_and_tokenizer,
    "ray_dataset": _ray_dataset,
}


@pytest.mark.parametrize("kind", list(VALUES))
def test_truncated_part_is_a_miss_and_removed(
    kind: str,
    backend: Backend,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    workdir: Path,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    ray_data = request.getfixturevalue("ray_data") if kind == "ray_dataset" else None
    cache = backend.cache()
    key = store(cache, VALUES[kind](ray_data))
    manifest = cache.manifest(key)
    assert manifest is not None
    largest = max(manifest.files, key=lambda f: f.size)
    path = f"{backend.entry(key)}/{manifest.data_dir}/{largest.name}"
    blob = backend.fs.cat_file(path)
    backend.fs.pipe_file(path, blob[: len(blob) // 2])

    reader = backend.cache()  # a fresh process's view
    assert reader.load(key, workdir=workdir) is None
    assert any(key[:12] in r.getMessage() for r in caplog.records), caplog.text
    assert not reader.contains(key)
    assert [p for p in backend.all_files() if key in p] == []
    # Stored again, it loads.
    key_again = store(reader, VALUES[kind](ray_data))
    assert reader.load(key_again, workdir=workdir) is not None
