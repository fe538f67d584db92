"""The built-in T5 distillation pipeline, run tiny (real models, real training steps)
against a real local PrefixCache."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
import os
import pickle
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from eeipu_ray.cache import PrefixCache
from eeipu_ray.errors import PipelineDefinitionError
from eeipu_ray.pipeline import Pipeline, StageContext
from eeipu_ray.pipelines import load_pipeline, t5
from eeipu_ray.search.space import SearchSpace

TINY = {"n_train": 32, "n_val": 8, "max_epochs": 2}
CONFIG = {
    "data": {"source_len": 64, "target_len": 40, "batch_size": 8},
    "teacher": {"lr": 1e-2, "weight_decay": 1e-3, "epochs": 2},
    "distill1": {"lr": 5e-3, "temperature": 2.0, "weight_decay": 1e-3},
    "distill2": {"lr": 5e-3, "temperature": 1.5, "weight_decay": 1e-3},
    "distill3": {"lr": 3e-3, "temperature": 1.0, "weight_decay": 1e-3},
    "evaluate": {"num_beams": 1},
}
STAGES = ["data", "teacher", "distill1", "distill2", "distill3", "evaluate"]


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return load_pipeline("t5", **TINY)


@pytest.fixture
def cache(tmp_path: Path) -> PrefixCache:
    return PrefixCache(str(tmp_path / "cache"))


def changed(config: dict, **stages: dict) -> dict:
    config = copy.deepcopy(config)
    for stage, params in stages.items():
        config[stage].update(params)
    return config


def write_pairs(path: Path, n: int = 48) -> list[dict[str, str]]:
    """A tiny copy task in ``path`` (.jsonl, .csv or .parquet by suffix)."""
    words = ["red", "blue", "green", "gold", "grey", "pink"]
    pairs = [
        {"source": f"the {words[i % 6]} box number {i} is here", "target": f"{words[i % 6]} {i}"}
        for i in range(n)
    ]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["id", "source", "target"])
            writer.writeheader()
            writer.writerows({"id": i, **p} for i, p in enumerate(pairs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(pairs), path)
    return pairs


# ------------------------------------------------------------------ pipeline
def test_builtin_registration_stage_order_and_pickling(pipeline):
    assert pipeline.name == "t5"
    assert pipeline.stage_names == STAGES
    # Ray ships the pipeline to its workers: module-level stage functions pickle.
    clone = pickle.loads(pickle.dumps(pipeline))
    assert clone.prefix_keys(CONFIG) == pipeline.prefix_keys(CONFIG)


def test_full_trial_scores_rouge_and_reports_every_epoch(pipeline):
    reports: list[dict] = []
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    out = pipeline.run(CONFIG, reporter=reports.append).output
    assert torch.equal(torch.rand(3), expected_draw)  # the global RNG is left alone
    assert set(out) == {"score", "rouge1"}
    assert 0.0 <= out["score"] <= 1.0 and 0.0 <= out["rouge1"] <= 1.0
    assert [(r["stage"], r["epoch"]) for r in reports] == [
        ("teacher", 1),
        ("teacher", 2),
        ("distill1", 1),
        ("distill2", 1),
        ("distill3", 1),
    ]
    for r in reports:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
    temperatures = [CONFIG[f"distill{k}"]["temperature"] for k in (1, 2, 3)]
    for r, temperature in zip(reports[2:], temperatures, strict=True):  # alpha = 0.5
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * temperature**2 * r["kl"])


def test_same_config_gives_the_same_score(pipeline):
    assert pipeline.run(CONFIG).output == pipeline.run(CONFIG).output


def test_training_lowers_the_loss_and_changes_the_weights(pipeline, cache, tmp_path):
    # Kind (a), by margin: seeded training, measured teacher loss 5.13 -> 3.81 and
    # distillation cross-entropy 3.25 -> 2.63, drops of 20-25 %, not rounding noise.
    reports: list[dict] = []
    pipeline.run(CONFIG, cache, reporter=reports.append)
    teacher_losses = [r["loss"] for r in reports if r["stage"] == "teacher"]
    assert teacher_losses[-1] < teacher_losses[0]
    # Segments use other temperatures: compare their cross-entropy terms.
    distill_ce = [r["ce"] for r in reports if r["stage"].startswith("distill")]
    assert distill_ce[-1] < distill_ce[0]

    keys = dict(zip(STAGES, pipeline.prefix_keys(CONFIG), strict=True))
    data = cache.load(keys["data"]).value
    trained = cache.load(keys["teacher"]).value["teacher"]["state_dict"]
    params = {**pipeline.nest_config(CONFIG)["teacher"], "epochs": 0}
    ctx = StageContext(stage="teacher", index=2, trial_dir=tmp_path)
    initial = t5._teacher(data, params, ctx)["teacher"]["state_dict"]
    assert initial.keys() == trained.keys()
    assert not torch.equal(initial["shared.weight"], trained["shared.weight"])
    assert torch.equal(
        initial["shared.weight"],
        t5._teacher(data, params, ctx)["teacher"]["state_dict"]["shared.weight"],
    )  # seeded

    students = [cache.load(keys[f"distill{k}"]).value["student"]["state_dict"] for k in (1, 2, 3)]
    for before, after in itertools.pairwise(students):
        assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    # Half the teacher's blocks: one per stack for the two-layer tiny teacher.
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in students[0]
    assert not any(k.startswith(("encoder.block.1.", "decoder.block.1.")) for k in students[0])


def test_a_shared_prefix_up_to_distill2_is_loaded_not_recomputed(pipeline, cache):
    first = pipeline.run(CONFIG, cache)
    assert first.memoized_stages == 0
    config = changed(CONFIG, distill3={"lr": 8e-3, "temperature": 3.0}, evaluate={"num_beams": 2})
    reports: list[dict] = []
    second = pipeline.run(config, cache, reporter=reports.append)
    assert second.memoized_stages == 4
    assert [s.status for s in second.stages] == ["loaded"] * 4 + ["executed"] * 2
    assert {r["stage"] for r in reports} == {"distill3"}  # only distill3 trained
    assert second.output == pipeline.run(config).output  # same as computed from scratch


def test_stage_outputs_are_tensors_and_plain_values(pipeline, cache):
    pipeline.run(CONFIG, cache)
    keys = dict(zip(STAGES, pipeline.prefix_keys(CONFIG), strict=True))
    assert all(cache.manifest(keys[s]).codec == "composite" for s in STAGES[:-1])
    data = cache.load(keys["data"]).value
    assert data["train"]["input_ids"].dtype == torch.int64
    assert data["train"]["input_ids"].shape == data["train"]["attention_mask"].shape
    assert len(data["train"]["labels"]) == TINY["n_train"] and len(data["val_targets"]) == 8
    labels = data["train"]["labels"]
    assert (labels == -100).any() and labels.shape[1] <= CONFIG["data"]["target_len"]
    distilled = cache.load(keys["distill2"]).value
    assert set(distilled) == {"teacher", "student", "train", "val", "val_targets", "run"}
    teacher = T5ForConditionalGeneration(T5Config.from_dict(distilled["teacher"]["config"]))
    teacher.load_state_dict(distilled["teacher"]["state_dict"])  # strict: every key present
    assert distilled["teacher"]["config"]["d_model"] == t5.SIZES["tiny"]["d_model"]


@pytest.mark.parametrize("source_len", [16, 64])
def test_data_split_is_seeded_and_truncates(source_len):
    params = {
        "source_len": source_len,
        "target_len": 8,
        "batch_size": 8,
        "data_path": None,
        "tokenizer_path": None,
        "n_train": 40,
        "n_val": 10,
        "seed": 0,
    }
    first, again = t5._data(None, params), t5._data(None, params)
    assert first["val_targets"] == again["val_targets"]
    assert torch.equal(first["train"]["input_ids"], again["train"]["input_ids"])
    other = t5._data(None, {**params, "seed": 1})
    assert other["val_targets"] != first["val_targets"]
    assert first["train"]["input_ids"].shape[1] <= source_len
    assert first["train"]["labels"].shape[1] == 8  # every toy target is longer: all cut
    sources, targets = t5.read_pairs(t5.DEFAULT_DATA)
    assert set(first["val_targets"]) <= set(targets)
    assert len(sources) == 600


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


def test_search_space_encodes_and_sampled_configs_run(pipeline):
    space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
    assert space.n_stages == 6
    assert [len(space.dims_of_stage(k)) for k in range(6)] == [3, 3, 3, 3, 3, 1]
    configs = [space.from_unit(x) for x in space.sample(4, seed=0)]
    for config in configs:
        assert len(pipeline.prefix_keys(config)) == 6
    assert 0.0 <= pipeline.run(configs[0]).output["score"] <= 1.0
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
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_user_data_file(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    pairs = write_pairs(path)
    pipeline = t5.build_pipeline(data_path=path, **TINY)
    cache = PrefixCache(str(tmp_path / "cache"))
    out = pipeline.run(CONFIG, cache).output
    assert 0.0 <= out["score"] <= 1.0
    data = cache.load(pipeline.prefix_keys(CONFIG)[0]).value
    assert set(data["val_targets"]) <= {p["target"] for p in pairs}
    # The file's bytes are part of the key: other contents, other cache entries.
    before = pipeline.prefix_keys(CONFIG)
    write_pairs(path, n=50)
    assert t5.build_pipeline(data_path=path, **TINY).prefix_keys(CONFIG)[0] != before[0]


def test_parquet_file_reads(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.parquet")
    sources, targets = t5.read_pairs(tmp_path / "pairs.parquet")
    assert sources == [p["source"] for p in pairs] and targets == [p["target"] for p in pairs]


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
    out = pipeline.run(CONFIG, cache).output
    assert 0.0 <= out["score"] <= 1.0
    keys = dict(zip(STAGES, pipeline.prefix_keys(CONFIG), strict=True))
    distilled = cache.load(keys["distill1"]).value
    assert distilled["teacher"]["config"]["d_model"] == 32  # the saved models, not "tiny"
    assert distilled["student"]["config"]["d_model"] == 16


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
    second = changed(CONFIG, distill3={"lr": 8e-3}, evaluate={"num_beams": 2})
    grid = tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        param_space=pipeline.search_space,
        tune_config=tune.TuneConfig(
            # One at a time: the second trial must find the first one's entries.
            search_alg=BasicVariantGenerator(points_to_evaluate=[CONFIG, second], max_concurrent=1),
            num_samples=2,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="t5", verbose=0),
    ).fit()
    assert not any(r.error for r in grid)
    results = sorted((r.metrics for r in grid), key=lambda m: m["memoized_stages"])
    assert [m["memoized_stages"] for m in results] == [0, 4]
    assert all(0.0 <= m["score"] <= 1.0 for m in results)
    assert results[1]["cache_hit/distill2"] == 1 and results[1]["cache_hit/distill3"] == 0
