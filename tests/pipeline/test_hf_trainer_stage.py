"""A Hugging Face Trainer set-up as a cached pipeline stage (eeipu_ray.hf)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from transformers import (
    ByT5Tokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    T5Config,
    T5ForConditionalGeneration,
)

from eeipu_ray import Pipeline, PrefixCache, Stage
from eeipu_ray.errors import PipelineDefinitionError, StageExecutionError
from eeipu_ray.hf import trainer_stage

PAIRS = [
    ("the cat sat on the mat", "cat sat"),
    ("a dog ran in the park", "dog ran"),
    ("rain fell over the city", "rain fell"),
    ("the sun rose at six", "sun rose"),
] * 4


def _tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()


def _data(_, hp, ctx):
    tok = _tokenizer()

    def encode(batch):
        enc = tok(batch["source"], truncation=True, max_length=hp["source_len"])
        enc["labels"] = tok(batch["target"], truncation=True, max_length=8)["input_ids"]
        return enc

    raw = datasets.Dataset.from_dict(
        {"source": [s for s, _ in PAIRS], "target": [t for _, t in PAIRS]}
    )
    split = raw.map(encode, batched=True, remove_columns=["source", "target"])
    return datasets.DatasetDict({"train": split, "validation": split.select(range(4))})


def _build(inputs, args, hp, ctx):
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=384, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
        dropout_rate=hp["dropout"], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    model = T5ForConditionalGeneration(config)
    tok = _tokenizer()
    return Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=inputs["train"],
        eval_dataset=inputs["validation"],
        data_collator=DataCollatorForSeq2Seq(tok, model=model),
        processing_class=tok,
    )


def _evaluate(trained, hp, ctx):
    model = T5ForConditionalGeneration.from_pretrained(trained["model_dir"])
    tok = ByT5Tokenizer.from_pretrained(trained["model_dir"])
    enc = tok([s for s, _ in PAIRS[:4]], return_tensors="pt", padding=True)
    labels = tok([t for _, t in PAIRS[:4]], return_tensors="pt", padding=True)["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    with torch.no_grad():
        loss = model(**enc, labels=labels).loss
    return {"score": -float(loss) * hp["scale"]}


def _pipeline(
    name: str = "hf-t5", batch_size: int = 4, num_workers: int | None = None
) -> Pipeline:
    """data -> a Seq2SeqTrainer fine-tuning a tiny T5 -> an evaluation of its loss."""
    return Pipeline(
        name,
        [
            Stage("data", _data, {"source_len": 32}),
            trainer_stage(
                "finetune",
                _build,
                {"learning_rate": 1e-3, "max_steps": 3, "dropout": 0.0, "seed": 0},
                args={"per_device_train_batch_size": batch_size, "logging_steps": 1},
                seq2seq=True,
                num_workers=num_workers,
            ),
            Stage("evaluate", _evaluate, {"scale": 1.0}),
        ],
    )


def test_trainer_stage_trains_reports_and_is_reused_from_the_cache(tmp_path: Path) -> None:
    pipeline = _pipeline()
    cache = PrefixCache(str(tmp_path / "cache"))
    reports: list[dict] = []
    config = {"data": {"source_len": 32},
              "finetune": {"learning_rate": 1e-3, "max_steps": 3, "dropout": 0.0, "seed": 0},
              "evaluate": {"scale": 1.0}}

    first = pipeline.run(config, cache, reporter=reports.append, meter=None)
    assert first.memoized_stages == 0
    assert torch.isfinite(torch.tensor(first.output["score"]))
    # The Trainer's per-step logs reached the reporter, tagged with the stage.
    steps = [r for r in reports if r.get("stage") == "finetune" and "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    final = [r for r in reports if r.get("stage") == "finetune" and "eval_loss" in r]
    assert final and "train_loss" in final[-1]

    # Another evaluation of the same fine-tuned model loads the cached model
    # directory instead of training again.
    again = dict(config, evaluate={"scale": 2.0})
    reports.clear()
    second = pipeline.run(again, cache, reporter=reports.append, meter=None)
    assert second.memoized_stages == 2
    assert not [r for r in reports if r.get("stage") == "finetune"]
    assert second.output["score"] == pytest.approx(2.0 * first.output["score"], rel=1e-6)

    # A different learning rate is a different prefix: trained afresh, from the
    # cached data stage.
    third = pipeline.run(
        dict(config, finetune={**config["finetune"], "learning_rate": 5e-3}), cache, meter=None
    )
    assert third.memoized_stages == 1
    assert third.output["score"] != first.output["score"]


def test_trainer_stage_rejects_bad_arguments() -> None:
    with pytest.raises(PipelineDefinitionError, match=r"args\['learning_rat'\].*TrainingArguments"):
        trainer_stage("ft", _build, {}, args={"learning_rat": 1e-3})
    with pytest.raises(PipelineDefinitionError, match="'learning_rate' is both"):
        trainer_stage("ft", _build, {"learning_rate": 1e-3}, args={"learning_rate": 1e-3})
    with pytest.raises(PipelineDefinitionError, match=r"args\['output_dir'\] is set by the stage"):
        trainer_stage("ft", _build, {}, args={"output_dir": "/tmp/x"})


def test_trainer_stage_names_a_builder_that_returns_no_trainer(tmp_path: Path) -> None:
    pipeline = Pipeline(
        "bad",
        [
            Stage("data", lambda _, hp: 1, {}),
            trainer_stage("ft", lambda inputs, args, hp, ctx: "not a trainer", {}),
        ],
    )
    with pytest.raises(StageExecutionError, match=r"build returned str, not a transformers"):
        pipeline.run({"data": {}, "ft": {}}, None, meter=None)
