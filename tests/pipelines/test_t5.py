"""The built-in T5 distillation pipeline, run tiny (real models, real Trainer steps, real
``datasets``) against a real local PrefixCache."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

import datasets
import numpy as np
import torch
from ray import cloudpickle
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration, set_seed

from eeipu_ray.cache import PrefixCache
from eeipu_ray.errors import PipelineDefinitionError
from eeipu_ray.pipeline import Pipeline, StageContext
from eeipu_ray.pipelines import load_pipeline, t5
from eeipu_ray.search.space import SearchSpace

TINY = {"n_train": 16, "n_val": 4, "max_epochs": 2}
CONFIG = {
    "data": {"source_len": 32, "target_len": 16, "batch_size": 8},
    "teacher": {"learning_rate": 1e-2, "weight_decay": 1e-3, "num_train_epochs": 2},
    "distill1": {"learning_rate": 5e-3, "temperature": 2.0, "weight_decay": 1e-3},
    "distill2": {"learning_rate": 5e-3, "temperature": 1.5, "weight_decay": 1e-3},
    "distill3": {"learning_rate": 3e-3, "temperature": 1.0, "weight_decay": 1e-3},
    "evaluate": {"num_beams": 1},
}
STAGES = ["data", "teacher", "distill1", "distill2", "distill3", "evaluate"]
DATA_PARAMS = {
    "source_len": 16,
    "target_len": 8,
    "batch_size": 8,
    "data_path": None,
    "tokenizer_path": None,
    "n_train": 40,
    "n_val": 10,
    "seed": 0,
}


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return load_pipeline("t5", **TINY)


class FirstRun:
    """CONFIG run once into a cache that the tests below share (each test adds
    entries of its own configs only)."""

    def __init__(self, pipeline: Pipeline, root: Path) -> None:
        self.cache = PrefixCache(str(root / "cache"))
        self.loaded = root / "loaded"  # where entries that restore files are loaded
        self.reports: list[dict[str, Any]] = []
        random.seed(123), np.random.seed(123), torch.manual_seed(123)
        self.expected_draws = (random.random(), np.random.rand(), torch.rand(3))
        random.seed(123), np.random.seed(123), torch.manual_seed(123)
        self.run = pipeline.run(CONFIG, self.cache, reporter=self.reports.append, meter=None)
        self.draws = (random.random(), np.random.rand(), torch.rand(3))
        self.keys = dict(zip(STAGES, pipeline.prefix_keys(CONFIG), strict=True))

    def entry(self, stage: str) -> Any:
        return self.cache.load(self.keys[stage], workdir=self.loaded).value

    def epoch_reports(self) -> list[dict[str, Any]]:
        """The trainers' per-epoch logs (the others: their end-of-training summaries)."""
        return [r for r in self.reports if "loss" in r]


@pytest.fixture(scope="module")
def first(pipeline, tmp_path_factory) -> FirstRun:
    return FirstRun(pipeline, tmp_path_factory.mktemp("t5-first"))


def changed(config: dict, **stages: dict) -> dict:
    config = copy.deepcopy(config)
    for stage, params in stages.items():
        config[stage].update(params)
    return config


def make_pairs(n: int = 48) -> list[dict[str, Any]]:
    """A tiny copy task, with an extra column that the pipeline drops."""
    words = ["red", "blue", "green", "gold", "grey", "pink"]
    return [
        {
            "id": i,
            "source": f"the {words[i % 6]} box number {i} is here",
            "target": f"{words[i % 6]} {i}",
        }
        for i in range(n)
    ]


def write_pairs(path: Path, n: int = 48) -> list[dict[str, Any]]:
    """``make_pairs(n)`` in ``path``: .jsonl, .csv or .parquet by suffix, else a
    ``save_to_disk`` directory."""
    pairs = make_pairs(n)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["id", "source", "target"])
            writer.writeheader()
            writer.writerows(pairs)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(pairs), path)
    else:
        datasets.Dataset.from_list(pairs).save_to_disk(str(path))
    return pairs


def ctx(stage: str, tmp_path: Path) -> StageContext:
    return StageContext(stage=stage, index=STAGES.index(stage) + 1, trial_dir=tmp_path)


# ------------------------------------------------------------------ pipeline
def test_builtin_registration_stage_order_and_pickling(pipeline):
    assert pipeline.name == "t5"
    assert pipeline.stage_names == STAGES
    # Ray ships the pipeline to its workers with cloudpickle.
    clone = cloudpickle.loads(cloudpickle.dumps(pipeline))
    assert clone.prefix_keys(CONFIG) == pipeline.prefix_keys(CONFIG)


def test_full_trial_scores_rouge_and_reports_every_epoch(first):
    assert first.draws[:2] == first.expected_draws[:2]  # Python's, NumPy's global RNG
    assert torch.equal(first.draws[2], first.expected_draws[2])  # and torch's: left alone
    out = first.run.output
    assert set(out) == {"score", "rouge1"}
    assert 0.0 <= out["score"] <= 1.0 and 0.0 <= out["rouge1"] <= 1.0
    epochs = first.epoch_reports()
    assert [(r["stage"], r["epoch"]) for r in epochs] == [
        ("teacher", 1),
        ("teacher", 2),
        ("distill1", 1),
        ("distill2", 1),
        ("distill3", 1),
    ]
    for r in epochs:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["learning_rate"] == CONFIG[r["stage"]]["learning_rate"]  # constant schedule
    temperatures = [CONFIG[f"distill{k}"]["temperature"] for k in (1, 2, 3)]
    for r, temperature in zip(epochs[2:], temperatures, strict=True):  # alpha = 0.5
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * temperature**2 * r["kl"])
    # The trainers' own summaries reach the reporter too.
    assert {r["stage"] for r in first.reports if "train_loss" in r} == set(STAGES[1:5])


def test_same_config_gives_the_same_score(pipeline, first):
    # From scratch, without the cache: the same as the first, cached, run.
    assert pipeline.run(CONFIG, meter=None).output == first.run.output


def test_training_lowers_the_loss_and_changes_the_weights(first):
    teacher_losses = [r["loss"] for r in first.epoch_reports() if r["stage"] == "teacher"]
    assert teacher_losses[-1] < teacher_losses[0]
    # Segments use other temperatures: compare their cross-entropy terms.
    distill_ce = [r["ce"] for r in first.epoch_reports() if r["stage"].startswith("distill")]
    assert distill_ce[-1] < distill_ce[0]

    data = first.entry("data")
    trained = T5ForConditionalGeneration.from_pretrained(first.entry("teacher")["teacher_dir"])
    set_seed(0)  # the teacher stage's seed
    initial = T5ForConditionalGeneration(t5._scratch_config("tiny", data["run"]))
    assert initial.state_dict().keys() == trained.state_dict().keys()
    assert not torch.equal(initial.shared.weight, trained.shared.weight)

    students = [
        T5ForConditionalGeneration.from_pretrained(first.entry(f"distill{k}")["student_dir"])
        for k in (1, 2, 3)
    ]
    for before, after in itertools.pairwise(students):
        assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
    # Half the teacher's blocks: one per stack for the two-layer tiny teacher.
    assert students[0].config.num_layers == students[0].config.num_decoder_layers == 1


def test_a_shared_prefix_up_to_distill2_is_loaded_not_recomputed(pipeline, first):
    config = changed(CONFIG, distill3={"learning_rate": 8e-3, "temperature": 3.0})
    reports: list[dict] = []
    second = pipeline.run(config, first.cache, reporter=reports.append, meter=None)
    assert second.memoized_stages == 4
    assert [s.status for s in second.stages] == ["loaded"] * 4 + ["executed"] * 2
    assert {r["stage"] for r in reports} == {"distill3"}  # only distill3 trained
    assert second.output == pipeline.run(config, meter=None).output  # as from scratch


def test_a_trial_sharing_the_teacher_loads_its_model_directory(pipeline, first, tmp_path):
    config = changed(CONFIG, distill1={"temperature": 3.5}, evaluate={"num_beams": 2})
    reports: list[dict] = []
    trial_dir = tmp_path / "trial"
    second = pipeline.run(
        config, first.cache, trial_dir=trial_dir, reporter=reports.append, meter=None
    )
    assert second.memoized_stages == 2
    assert [s.status for s in second.stages[:3]] == ["loaded", "loaded", "executed"]
    assert not any(r["stage"] in ("data", "teacher") for r in reports)
    assert not (trial_dir / "teacher").exists()  # the teacher stage never ran here
    # The cached model directory came back as files, and distillation read them.
    restored = list((trial_dir / ".restored").glob("restored-*/teacher-model"))
    assert len(restored) == 1
    assert {"config.json", "model.safetensors"} <= {f.name for f in restored[0].iterdir()}
    assert (restored[0] / "model.safetensors").read_bytes() == (
        first.entry("teacher")["teacher_dir"] / "model.safetensors"
    ).read_bytes()
    assert (trial_dir / "distill1" / "distill1-model" / "model.safetensors").is_file()
    assert 0.0 <= second.output["score"] <= 1.0


def test_stage_outputs_are_datasets_model_directories_and_settings(first):
    codecs = {first.cache.manifest(first.keys[s]).codec for s in STAGES[:-1]}
    assert codecs == {"composite"}
    data = first.entry("data")
    assert set(data) == {"train", "validation", "run"}
    train, validation = data["train"], data["validation"]
    assert isinstance(train, datasets.Dataset) and isinstance(validation, datasets.Dataset)
    assert train.column_names == ["input_ids", "attention_mask", "labels"]
    assert set(validation.column_names) == {"input_ids", "attention_mask", "labels", "target"}
    assert len(train) == TINY["n_train"] and len(validation) == TINY["n_val"]
    target_len, source_len = CONFIG["data"]["target_len"], CONFIG["data"]["source_len"]
    assert max(len(labels) for labels in train["labels"]) == target_len  # cut, unpadded
    assert all(len(ids) <= source_len for ids in train["input_ids"])
    assert any(len(t) > target_len for t in validation["target"])  # the full references
    assert data["run"]["batch_size"] == CONFIG["data"]["batch_size"]

    distilled = first.entry("distill2")
    assert set(distilled) == {"teacher_dir", "student_dir", "train", "validation", "run"}
    teacher = T5ForConditionalGeneration.from_pretrained(distilled["teacher_dir"])
    assert teacher.config.d_model == t5.SIZES["tiny"]["d_model"]
    assert (
        T5ForConditionalGeneration.from_pretrained(distilled["student_dir"]).config.num_layers == 1
    )


@pytest.mark.parametrize("source_len", [16, 64])
def test_data_split_is_seeded_and_truncates(tmp_path, source_len):
    params = {**DATA_PARAMS, "source_len": source_len}
    first = t5._data(None, params, ctx("data", tmp_path))
    again = t5._data(None, params, ctx("data", tmp_path))
    assert first["validation"]["target"] == again["validation"]["target"]
    assert first["train"]["input_ids"] == again["train"]["input_ids"]
    other = t5._data(None, {**params, "seed": 1}, ctx("data", tmp_path))
    assert other["validation"]["target"] != first["validation"]["target"]
    assert max(len(ids) for ids in first["train"]["input_ids"]) <= source_len
    assert {len(labels) for labels in first["train"]["labels"]} == {8}  # toy targets: all cut
    pairs = t5.load_pairs(t5.resolve_source(None))
    assert set(first["validation"]["target"]) <= set(pairs["target"])
    assert len(pairs) == 600


def test_kd_loss_terms():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    labels = torch.tensor([[1, 2, -100], [4, -100, -100]])
    keep = labels != -100
    ce = torch.nn.functional.cross_entropy(student[keep], labels[keep])
    loss = t5._kd_loss(student, teacher, labels, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(loss["loss"], ce)
    same = t5._kd_loss(student, student.clone(), labels, temperature=3.0, alpha=0.0)
    assert float(same["loss"]) == pytest.approx(0.0, abs=1e-6)
    # Padding positions do not count.
    noisy = student.clone()
    noisy[~keep] = 100.0
    torch.testing.assert_close(
        t5._kd_loss(noisy, teacher, labels, 2.0, 0.5)["loss"],
        t5._kd_loss(student, teacher, labels, 2.0, 0.5)["loss"],
    )
    # T**2 * KL over the kept tokens, KL summed over the vocabulary.
    p_t = torch.softmax(teacher[keep] / 2.0, dim=-1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student[keep] / 2.0, dim=-1))).sum(-1).mean()
    half = t5._kd_loss(student, teacher, labels, 2.0, 0.25)
    torch.testing.assert_close(half["loss"], 0.25 * ce + 0.75 * 4.0 * kl)


def test_student_takes_every_other_teacher_block():
    config = T5Config(
        vocab_size=384, d_model=16, d_ff=32, d_kv=8, num_layers=4, num_heads=2, dropout_rate=0.0
    )
    teacher = T5ForConditionalGeneration(config)
    student = t5._new_student(teacher, {"model_path": None, "student_init": "teacher"}, 384)
    assert student.config.num_layers == student.config.num_decoder_layers == 2
    s, t = student.state_dict(), teacher.state_dict()
    for stack in ("encoder", "decoder"):
        for i, j in ((0, 0), (1, 2)):
            key = f"{stack}.block.{i}.layer.0.SelfAttention.k.weight"
            assert torch.equal(s[key], t[key.replace(f".block.{i}.", f".block.{j}.")])
    assert torch.equal(s["shared.weight"], t["shared.weight"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = t5._new_student(teacher, {"model_path": None, "student_init": "random"}, 384)
    assert fresh.config.num_layers == 2
    assert not torch.equal(fresh.state_dict()["shared.weight"], t["shared.weight"])


def test_training_hyperparameters_are_trainer_arguments(pipeline):
    space = pipeline.search_space
    for stage in STAGES[1:5]:
        assert {"learning_rate", "weight_decay", "num_train_epochs", "seed"} <= set(space[stage])
    assert space["distill1"]["num_train_epochs"] == 1 and space["distill1"]["alpha"] == t5.ALPHA
    assert set(space["data"]) >= {"source_len", "target_len", "batch_size", "data_fingerprint"}


def test_search_space_encodes_and_sampled_configs_run(pipeline):
    space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
    assert space.n_stages == 6
    assert [len(space.dims_of_stage(k)) for k in range(6)] == [3, 3, 3, 3, 3, 1]
    configs = [space.from_unit(x) for x in space.sample(4, seed=0)]
    for config in configs:
        assert len(pipeline.prefix_keys(config)) == 6
    assert 0.0 <= pipeline.run(configs[0], meter=None).output["score"] <= 1.0
    default = t5.build_pipeline()  # the shipped defaults encode too
    assert SearchSpace.from_tune(default.search_space, stage_order=STAGES).n_stages == 6


def test_shipped_data_is_what_the_script_makes(tmp_path):
    script = Path(t5.__file__).with_name("data") / "make_t5_toy.py"
    spec = importlib.util.spec_from_file_location("make_t5_toy", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_jsonl(tmp_path / "again.jsonl", module.make_pairs())
    assert (tmp_path / "again.jsonl").read_bytes() == t5.DEFAULT_DATA.read_bytes()
    assert t5.DEFAULT_DATA.stat().st_size < 200_000


# --------------------------------------------------------------- user inputs
@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.csv", "pairs.parquet", "saved"])
def test_user_data_loads_with_datasets(tmp_path, name):
    path = tmp_path / name
    pairs = write_pairs(path)
    source = t5.resolve_source(path)
    assert source.kind == ("disk" if name == "saved" else "file")
    loaded = t5.load_pairs(source)
    assert loaded.column_names == ["source", "target"]  # "id" dropped
    assert loaded["source"] == [p["source"] for p in pairs]
    assert loaded["target"] == [p["target"] for p in pairs]
    # The contents are part of the key: other rows, other cache entries.
    before = t5.build_pipeline(data_path=path, **TINY).prefix_keys(CONFIG)
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    write_pairs(path, n=50)
    assert t5.build_pipeline(data_path=path, **TINY).prefix_keys(CONFIG)[0] != before[0]
    assert (
        t5.build_pipeline(data_path=path, **TINY).prefix_keys(CONFIG)[0]
        == (t5.build_pipeline(data_path=path, **TINY).prefix_keys(CONFIG)[0])
    )


def test_saved_dataset_dict_gives_its_train_split(tmp_path):
    pairs = make_pairs()
    splits = datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(pairs[:5]),
            "train": datasets.Dataset.from_list(pairs[5:]),
        }
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    loaded = t5.load_pairs(t5.resolve_source(tmp_path / "splits"))
    assert loaded["target"] == [p["target"] for p in pairs[5:]]
    datasets.DatasetDict({"a": splits["test"], "b": splits["train"]}).save_to_disk(
        str(tmp_path / "no-train")
    )
    with pytest.raises(PipelineDefinitionError, match=r"no-train' holds the splits \['a', 'b'\]"):
        t5.build_pipeline(data_path=tmp_path / "no-train", **TINY)


def test_user_data_file_runs_through_the_pipeline(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.parquet")
    pipeline = t5.build_pipeline(data_path=tmp_path / "pairs.parquet", **TINY)
    cache = PrefixCache(str(tmp_path / "cache"))
    out = pipeline.run(CONFIG, cache, meter=None).output
    assert 0.0 <= out["score"] <= 1.0
    data = cache.load(pipeline.prefix_keys(CONFIG)[0], workdir=tmp_path / "loaded").value
    assert set(data["validation"]["target"]) <= {p["target"] for p in pairs}


def test_a_hub_dataset_offline_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        PipelineDefinitionError, match=r"data_path 'someone/news-pairs'.*HF_HUB_OFFLINE"
    ):
        t5.build_pipeline(data_path="someone/news-pairs", **TINY)
    with pytest.raises(PipelineDefinitionError, match=r"data_path 'not a name!' is neither"):
        t5.build_pipeline(data_path="not a name!", **TINY)


def test_missing_column_names_the_file_and_the_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"source": "a b c", "summary": "a"}\n' * 20)
    with pytest.raises(PipelineDefinitionError, match=r"bad\.jsonl.*'target'"):
        t5.build_pipeline(data_path=path, **TINY)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("pairs.txt", "source,target\na,b\n", r"pairs\.txt.*unknown format '\.txt'"),
        (
            "holes.csv",
            "source,target\na,b\nc,\n",
            r"holes\.csv.*'target' is missing or empty in row 1",
        ),
        ("null.jsonl", '{"source": null, "target": "a"}\n', r"null\.jsonl.*'source' is missing"),
        ("short.csv", "source,target\na,b\nc,d\n", r"short\.csv' has 2 rows"),
        ("broken.jsonl", '{"source": "a", "target"\n', r"broken\.jsonl.*could not be read"),
    ],
)
def test_bad_data_files_are_named(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PipelineDefinitionError, match=pattern):
        t5.build_pipeline(data_path=path, **TINY)


def test_a_directory_that_is_no_saved_dataset_is_named(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(PipelineDefinitionError, match=r"models' is a directory but not a dataset"):
        t5.build_pipeline(data_path=tmp_path / "models", **TINY)


@pytest.mark.parametrize(
    "argument", ["data_path", "tokenizer_path", "teacher_path", "student_path"]
)
def test_nonexistent_paths_are_named(tmp_path, argument):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"{argument} .*nowhere"):
        t5.build_pipeline(**{argument: missing}, **TINY)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"size": "huge"}, "size must be one of"),
        ({"n_val": 0}, "n_val must be an int >= 1"),
        ({"n_train": 0}, "n_train must be None or an int >= 1"),
        ({"max_epochs": 0}, "max_epochs must be an int >= 1"),
        ({"student_init": "copy"}, "student_init must be 'teacher' or 'random'"),
    ],
)
def test_bad_options(options, pattern):
    with pytest.raises(PipelineDefinitionError, match=pattern):
        t5.build_pipeline(**{**TINY, **options})


def save_model(path: Path, d_model: int, num_layers: int, vocab_size: int = 384) -> Path:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=8,
        num_layers=num_layers,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        T5ForConditionalGeneration(config).save_pretrained(path)
    return path


def test_local_pretrained_teacher_student_and_tokenizer(tmp_path):
    teacher_dir = save_model(tmp_path / "teacher", d_model=32, num_layers=2)
    ByT5Tokenizer().save_pretrained(teacher_dir)  # found next to the teacher
    student_dir = save_model(tmp_path / "student", d_model=16, num_layers=1)
    tokenizer_dir = tmp_path / "tokenizer"
    ByT5Tokenizer().save_pretrained(tokenizer_dir)
    pipeline = t5.build_pipeline(
        teacher_path=teacher_dir, student_path=student_dir, tokenizer_path=tokenizer_dir, **TINY
    )
    assert pipeline.search_space["data"]["tokenizer_path"] == str(tokenizer_dir.resolve())
    assert t5.build_pipeline(teacher_path=teacher_dir, **TINY).search_space["data"][
        "tokenizer_path"
    ] == str(teacher_dir.resolve())
    cache = PrefixCache(str(tmp_path / "cache"))
    out = pipeline.run(CONFIG, cache, meter=None).output
    assert 0.0 <= out["score"] <= 1.0
    keys = dict(zip(STAGES, pipeline.prefix_keys(CONFIG), strict=True))
    distilled = cache.load(keys["distill1"], workdir=tmp_path / "loaded").value
    # The saved models, not "tiny".
    assert T5Config.from_pretrained(distilled["teacher_dir"]).d_model == 32
    assert T5Config.from_pretrained(distilled["student_dir"]).d_model == 16


def test_student_with_another_vocabulary_is_refused(tmp_path):
    student_dir = save_model(tmp_path / "student", d_model=16, num_layers=1, vocab_size=512)
    with pytest.raises(PipelineDefinitionError, match=r"student_path .*student.* 512"):
        t5.build_pipeline(student_path=student_dir, **TINY)


def test_teacher_with_too_few_embeddings_is_refused(tmp_path):
    teacher_dir = save_model(tmp_path / "teacher", d_model=16, num_layers=1, vocab_size=100)
    with pytest.raises(
        PipelineDefinitionError, match=r"teacher_path .*teacher.* 100 token embeddings"
    ):
        t5.build_pipeline(teacher_path=teacher_dir, **TINY)


# ------------------------------------------------------------------ Ray Tune
@pytest.mark.slow
def test_tune_trials_share_a_prefix_through_the_cache(ray_local, tmp_path):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    pipeline = load_pipeline("t5", **TINY)
    cache = PrefixCache(str(tmp_path / "cache"))
    second = changed(CONFIG, distill3={"learning_rate": 8e-3}, evaluate={"num_beams": 2})
    grid = tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        param_space=pipeline.search_space,
        tune_config=tune.TuneConfig(
            # One at a time: the second trial must find the first one's entries.
            search_alg=BasicVariantGenerator(points_to_evaluate=[CONFIG, second], max_concurrent=1),
            num_samples=2,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="t5", verbose=0),
    ).fit()
    assert not any(r.error for r in grid)
    results = sorted((r.metrics for r in grid), key=lambda m: m["memoized_stages"])
    assert [m["memoized_stages"] for m in results] == [0, 4]
    assert all(0.0 <= m["score"] <= 1.0 for m in results)
    assert results[1]["cache_hit/distill2"] == 1 and results[1]["cache_hit/distill3"] == 0
