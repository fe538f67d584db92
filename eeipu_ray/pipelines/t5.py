"""T5 fine-tuning and distillation as a cached pipeline: ``data`` -> ``teacher`` ->
``distill1`` -> ``distill2`` -> ``distill3`` -> ``evaluate`` (ROUGE), on ``datasets``
and the Hugging Face ``Seq2SeqTrainer``, made by :func:`build_pipeline`.

The stages (after the EEIPU paper's, Essofi et al., arXiv 2411.03731; the first
five are cached, so trials that agree on the data, the teacher and the first
segments share a long prefix):

1. ``data`` (``source_len``, ``target_len``, ``batch_size``): load the
   ``source``/``target`` pairs with ``datasets``, hold out ``n_val`` of them
   (a seeded permutation), keep up to ``n_train`` of the rest, tokenize
   (truncated to ``source_len`` and ``target_len`` tokens). Output: the
   ``train`` and ``validation`` ``datasets.Dataset`` (the latter with the
   full ``target`` text) and the run's settings.
2. ``teacher`` (``learning_rate``, ``weight_decay``, ``num_train_epochs``,
   ``seed``: ``Seq2SeqTrainingArguments``): fine-tune a
   ``T5ForConditionalGeneration`` with a ``Seq2SeqTrainer``
   (:func:`eeipu_ray.hf.trainer_stage`): AdamW at a constant learning rate,
   gradients clipped to :data:`MAX_GRAD_NORM`, the data stage's
   ``batch_size``; bf16 (else fp16) on CUDA, float32 on the CPU. Output:
   ``teacher_dir``, the trained model's ``save_pretrained`` directory.
3. ``distill1``-``distill3`` (``learning_rate``, ``weight_decay``,
   ``temperature``; ``num_train_epochs`` = ``distill_epochs``, ``alpha`` =
   :data:`ALPHA`): train a student with half the teacher's layers on the
   loss of :class:`DistillationTrainer`. Segment 1 creates it (see
   ``student_path`` and ``student_init``), segments 2 and 3 continue from
   the previous ``student_dir`` with a fresh optimizer. Output: the
   teacher's and the student's directories.
4. ``evaluate`` (``num_beams``): generate a summary of every validation
   source (at most ``target_len`` tokens) and score it against the full
   reference: ``score`` is the mean ROUGE-L F1, ``rouge1`` the mean ROUGE-1 F1.

Every training stage reports the trainer's logs once per epoch. On the CPU,
with the same number of threads, a config always gives the same score; the
stages leave the global random state as they found it.

Known limitations: every cached ``teacher`` and ``distill`` entry holds a
copy of the teacher's directory (a segment needs the teacher, and an entry
must be self-contained): give a large teacher's cache a byte budget
(``--cache-budget``). Local paths are read by whichever worker runs the
stage: on a cluster they must exist on every node. A model or tokenizer
directory enters the prefix key only through its ``config.json`` and its
files' names and sizes: write new weights to a new directory. A data file enters
it through a hash of its bytes, a saved dataset directory through its files'
names and sizes and its metadata (the datasets' fingerprints).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The first optimizer a process builds imports torch._dynamo (~2 s on one core);
# transformers, accelerate and rouge_score take a few seconds more. Import them
# with this module, so that they are not charged to the first trial's stages.
import torch._dynamo
import torch.nn.functional as F

try:
    from rouge_score.rouge_scorer import RougeScorer
    from transformers import (
        AutoTokenizer,
        ByT5Tokenizer,
        DataCollatorForSeq2Seq,
        PreTrainedTokenizerBase,
        PrinterCallback,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        T5Config,
        T5ForConditionalGeneration,
        set_seed,
    )

    from eeipu_ray.hf import trainer_stage
    from eeipu_ray.pipelines._t5_data import (
        DATA_SUFFIXES,
        DEFAULT_DATA,
        DataSource,
        fingerprint,
        load_pairs,
        quiet,
        quiet_map,
        resolve_source,
    )
except ImportError as exc:  # dependencies of this pipeline only
    raise ImportError(
        f"the t5 pipeline needs transformers, accelerate, datasets and rouge-score "
        f"({exc.name} is missing): pip install 'eeipu-ray[t5]'"
    ) from exc

from eeipu_ray.errors import PipelineDefinitionError
from eeipu_ray.pipeline import Pipeline, Stage, StageContext

__all__ = [
    "ALPHA",
    "DATA_SUFFIXES",
    "DEFAULT_DATA",
    "MAX_GRAD_NORM",
    "SIZES",
    "DistillationTrainer",
    "build_pipeline",
    "load_pairs",
    "resolve_source",
]

ALPHA = 0.5
"""Weight of the cross-entropy term of the distillation loss (1 - ALPHA weighs the KL term)."""

MAX_GRAD_NORM = 1.0
"""Gradient clipping norm of every training step."""

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16},
    "small": {"d_model": 128, "d_ff": 512, "num_layers": 4, "num_heads": 4, "d_kv": 32},
}
"""Teacher shapes built from a ``T5Config`` when no ``teacher_path`` is given
(same depth for encoder and decoder, no dropout). The student has half the layers.
``"small"`` costs about four times as much compute per epoch as ``"tiny"``."""

TRAINER_ARGS: dict[str, Any] = {
    "optim": "adamw_torch",
    "lr_scheduler_type": "constant",  # no warmup, no decay
    "max_grad_norm": MAX_GRAD_NORM,
    "logging_strategy": "epoch",  # one report per epoch
    "dataloader_pin_memory": False,  # batches of a few KB
}
"""``Seq2SeqTrainingArguments`` every training stage shares (the searched ones are
in the stages' spaces; the batch size and, on CUDA, the precision are the run's)."""

EVAL_BATCH_SIZE = 64
IGNORE_INDEX = -100
VERSION = "2"  # datasets and model directories; the cache's entries of version 1 held tensors


# ---------------------------------------------------------------------- stages
def _data(_: None, p: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    source = resolve_source(p["data_path"])
    pairs = load_pairs(source)
    val_idx, train_idx = _split(len(pairs), p["n_val"], p["n_train"], p["seed"], source)
    tokenizer = _load_tokenizer(p["tokenizer_path"])

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        sources = tokenizer(batch["source"], max_length=p["source_len"], truncation=True)
        targets = tokenizer(
            text_target=batch["target"], max_length=p["target_len"], truncation=True
        )
        return {
            "input_ids": sources["input_ids"],
            "attention_mask": sources["attention_mask"],
            "labels": targets["input_ids"],
        }

    # Validation keeps the full reference: a short target_len is scored against what it cut.
    return {
        "train": quiet_map(pairs.select(train_idx), encode, remove_columns=["source", "target"]),
        "validation": quiet_map(pairs.select(val_idx), encode, remove_columns=["source"]),
        "run": {
            "batch_size": int(p["batch_size"]),
            "target_len": int(p["target_len"]),
            "tokenizer_path": p["tokenizer_path"],
            "vocab_size": len(tokenizer),
            "pad_token_id": int(tokenizer.pad_token_id),
            "eos_token_id": int(tokenizer.eos_token_id),
        },
    }


def _build_teacher(
    data: dict[str, Any], args: Seq2SeqTrainingArguments, hp: dict[str, Any], ctx: StageContext
) -> Seq2SeqTrainer:
    run = data["run"]
    set_seed(hp["seed"])  # weight initialization
    if hp["model_path"] is not None:
        model = _pretrained(hp["model_path"], "teacher_path")
        _check_vocab(model.config, run["vocab_size"], hp["model_path"], "teacher_path")
    else:
        model = T5ForConditionalGeneration(_scratch_config(hp["size"], run))
    return _without_printer(
        Seq2SeqTrainer(
            model=model,
            args=_run_args(args, run, ctx.device),
            train_dataset=data["train"],
            data_collator=_collator(run, model),
        )
    )


def _teacher_output(data: dict[str, Any], model_dir: Path, _: dict[str, float]) -> dict[str, Any]:
    return {"teacher_dir": model_dir, **_carried(data)}


def _build_distill(
    inputs: dict[str, Any], args: Seq2SeqTrainingArguments, hp: dict[str, Any], ctx: StageContext
) -> DistillationTrainer:
    temperature, alpha = float(hp["temperature"]), float(hp["alpha"])
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {hp['temperature']!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {hp['alpha']!r}")
    run = inputs["run"]
    set_seed(hp["seed"])  # a random student's initialization
    teacher = _pretrained(inputs["teacher_dir"], "the teacher stage's model")
    if "student_dir" in inputs:  # segments 2, 3: continue
        student = _pretrained(inputs["student_dir"], "the previous segment's student")
    else:  # segment 1: create
        student = _new_student(teacher, hp, run["vocab_size"])
    if student.config.vocab_size != teacher.config.vocab_size:
        raise PipelineDefinitionError(
            f"the student's vocabulary ({student.config.vocab_size}) differs from the "
            f"teacher's ({teacher.config.vocab_size}); distillation compares their "
            "output distributions token by token, so they must be equal"
        )
    return _without_printer(
        DistillationTrainer(
            teacher=teacher,
            temperature=temperature,
            alpha=alpha,
            model=student,
            args=_run_args(args, run, ctx.device),
            train_dataset=inputs["train"],
            data_collator=_collator(run, student),
        )
    )


def _distill_output(inputs: dict[str, Any], model_dir: Path, _: dict[str, float]) -> dict[str, Any]:
    return {"teacher_dir": inputs["teacher_dir"], "student_dir": model_dir, **_carried(inputs)}


def _evaluate(distilled: dict[str, Any], p: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    num_beams = int(p["num_beams"])
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {p['num_beams']!r}")
    device = torch.device(ctx.device)
    run = distilled["run"]
    tokenizer = _load_tokenizer(run["tokenizer_path"])
    model = _pretrained(distilled["student_dir"], "the distilled student").to(device).eval()
    validation = distilled["validation"]
    predictions: list[str] = []
    with torch.no_grad():
        for start in range(0, len(validation), EVAL_BATCH_SIZE):
            rows = validation[start : start + EVAL_BATCH_SIZE]
            batch = tokenizer.pad(
                {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
                return_tensors="pt",
            ).to(device)
            with _autocast(device):
                generated = model.generate(
                    **batch, max_new_tokens=run["target_len"], num_beams=num_beams, do_sample=False
                )
            predictions += tokenizer.batch_decode(generated, skip_special_tokens=True)
    scorer = RougeScorer(["rouge1", "rougeL"])
    scores = [
        scorer.score(reference, prediction)
        for reference, prediction in zip(validation["target"], predictions, strict=True)
    ]
    return {
        "score": sum(s["rougeL"].fmeasure for s in scores) / len(scores),
        "rouge1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
    }


# ------------------------------------------------------------------- training
class DistillationTrainer(Seq2SeqTrainer):
    """A ``Seq2SeqTrainer`` whose loss distils a frozen teacher into the model.

    Knowledge distillation (Hinton et al., 2015) over the target positions that
    are not padding (label -100), the logits under teacher forcing::

        L = alpha * CE(student, labels)
            + (1 - alpha) * T**2 * KL(softmax(teacher / T) || softmax(student / T))

    Each logged ``loss`` comes with ``ce`` and ``kl`` (without the ``T**2``
    factor), means over the same training steps.

    Args:
        teacher: The teacher, same vocabulary as the model; moved to the
            trainer's device, frozen.
        temperature: ``T > 0``.
        alpha: Weight of the cross-entropy term, in [0, 1].
        **kwargs: ``Seq2SeqTrainer``'s (``model`` is the student).

    Example:
        >>> trainer = DistillationTrainer(  # doctest: +SKIP
        ...     teacher=teacher, temperature=2.0, alpha=0.5,
        ...     model=student, args=args, train_dataset=train, data_collator=collator)
    """

    def __init__(
        self,
        *,
        teacher: T5ForConditionalGeneration,
        temperature: float,
        alpha: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        self._terms: dict[str, list[torch.Tensor]] = {"ce": [], "kl": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            teacher_logits = _logits(self.teacher, inputs)
        student_logits = _logits(model, inputs)
        losses = _kd_loss(
            student_logits, teacher_logits, inputs["labels"], self.temperature, self.alpha
        )
        if model.training:
            for term in self._terms:
                self._terms[term].append(losses[term].detach())
        return (losses["loss"], {"logits": student_logits}) if return_outputs else losses["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._terms["ce"]:  # a training log: the steps since the last
            for term, values in self._terms.items():
                logs[term] = float(torch.stack(values).mean())
                values.clear()
        super().log(logs, start_time)


def _logits(model: T5ForConditionalGeneration, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Decoder logits ``b x t x vocab`` under teacher forcing (the labels shifted right
    behind the start token, as T5 does with ``labels=``), without T5's own loss."""
    decoder_input_ids = batch.get("decoder_input_ids")
    if decoder_input_ids is None:
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_input_ids,
    ).logits


def _kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float = 0.5,
) -> dict[str, torch.Tensor]:
    """The loss of :class:`DistillationTrainer`, averaged over target tokens.

    Args:
        student_logits: ``b x t x vocab``.
        teacher_logits: ``b x t x vocab``, same vocabulary.
        labels: ``b x t`` token ids, -100 at padding.
        temperature: Softening temperature ``T > 0``.
        alpha: Weight of the cross-entropy term, in [0, 1].

    Returns:
        ``{"loss": L, "ce": CE, "kl": KL}`` (scalars; KL without the ``T**2`` factor).
    """
    keep = labels != IGNORE_INDEX
    student = student_logits[keep].float()  # tokens x vocab
    teacher = teacher_logits[keep].float()
    ce = F.cross_entropy(student, labels[keep])
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="batchmean",  # sum over the vocabulary, mean over tokens
        log_target=True,
    )
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def _run_args(
    args: Seq2SeqTrainingArguments, run: Mapping[str, Any], device: str
) -> Seq2SeqTrainingArguments:
    """``args`` with the run's batch size and, on CUDA, mixed precision: bf16 where the
    GPU has it, else fp16 (with a gradient scaler); float32 on the CPU."""
    precision = {}
    if device.startswith("cuda"):
        precision = {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    # replace, not setattr: TrainingArguments derives settings from these in __post_init__.
    return dataclasses.replace(args, per_device_train_batch_size=run["batch_size"], **precision)


def _collator(run: Mapping[str, Any], model: T5ForConditionalGeneration) -> DataCollatorForSeq2Seq:
    """Pads each batch to its longest row, labels with -100; adds the decoder inputs."""
    return DataCollatorForSeq2Seq(
        _load_tokenizer(run["tokenizer_path"]), model=model, label_pad_token_id=IGNORE_INDEX
    )


def _without_printer(trainer: Seq2SeqTrainer) -> Seq2SeqTrainer:
    # The logs reach Tune through the stage's callback; printed too, they flood the console.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _carried(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What every stage after ``data`` passes on unchanged."""
    return {key: inputs[key] for key in ("train", "validation", "run")}


def _autocast(device: torch.device) -> Any:
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class _Contained:
    """Runs a stage function without progress bars, then puts Python's, NumPy's and
    torch's global random states back (the Trainer seeds them all): a stage must not
    change what the code around it draws next."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __getattr__(self, name: str) -> Any:
        # What a multi-worker stage says about itself (its worker group) passes through.
        if name != "worker_group":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, inputs: Any, params: dict[str, Any], ctx: StageContext) -> Any:
        python_state, numpy_state = random.getstate(), np.random.get_state()
        cuda = ctx.device.startswith("cuda") and torch.cuda.is_available()
        devices = list(range(torch.cuda.device_count())) if cuda else []
        try:
            with torch.random.fork_rng(devices=devices), quiet():
                return self.fn(inputs, params, ctx)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _training_stage(
    name: str, build: Any, space: dict[str, Any], output: Any, workers: int | None, use_gpu: bool
) -> Stage:
    stage = trainer_stage(
        name,
        build,
        space,
        args=TRAINER_ARGS,
        seq2seq=True,
        evaluate=False,
        output=output,
        num_workers=workers,
        use_gpu=use_gpu,
        version=VERSION,
    )
    return Stage(stage.name, _Contained(stage.fn), stage.space, version=stage.version)


# --------------------------------------------------------------------- models
def _scratch_config(size: str, run: Mapping[str, Any]) -> T5Config:
    shape = SIZES[size]
    return T5Config(
        vocab_size=run["vocab_size"],
        d_model=shape["d_model"],
        d_ff=shape["d_ff"],
        d_kv=shape["d_kv"],
        num_layers=shape["num_layers"],
        num_decoder_layers=shape["num_layers"],
        num_heads=shape["num_heads"],
        dropout_rate=0.0,  # a few epochs on a few hundred pairs: dropout only slows learning
        pad_token_id=run["pad_token_id"],
        eos_token_id=run["eos_token_id"],
        decoder_start_token_id=run["pad_token_id"],  # T5's convention
    )


def _new_student(
    teacher: T5ForConditionalGeneration, p: Mapping[str, Any], vocab_size: int
) -> T5ForConditionalGeneration:
    """The student of segment 1: from ``p["model_path"]``, or the teacher with half its
    blocks (at least one per stack), initialized from the teacher's embeddings and every
    other block (``p["student_init"] == "teacher"``, DistilBERT-style) or at random
    (``"random"``; seeded by the caller)."""
    if p["model_path"] is not None:
        student = _pretrained(p["model_path"], "student_path")
        _check_vocab(student.config, vocab_size, p["model_path"], "student_path")
        return student
    if p["student_init"] not in ("teacher", "random"):
        raise ValueError(f"student_init must be 'teacher' or 'random', got {p['student_init']!r}")
    config = T5Config.from_dict(teacher.config.to_dict())
    config.num_layers = max(1, config.num_layers // 2)
    config.num_decoder_layers = max(1, config.num_decoder_layers // 2)
    student = T5ForConditionalGeneration(config)
    if p["student_init"] == "teacher":
        student.load_state_dict(_every_other_block(teacher.state_dict(), student.state_dict()))
    return student


def _every_other_block(
    teacher_state: Mapping[str, torch.Tensor], student_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Student weights taken from the teacher: block ``i`` of each stack from the
    teacher's block ``2 i`` (block 0 holds T5's relative position bias), every
    other tensor (embeddings, final norms) from the tensor of the same name."""
    block = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.")
    state = {}
    for key in student_state:
        source = block.sub(lambda m: f"{m[1]}.block.{2 * int(m[2])}.", key)
        state[key] = teacher_state[source].detach().clone()
    return state


def _pretrained(path: str | Path, argument: str) -> T5ForConditionalGeneration:
    try:
        # float32 whatever the checkpoint's dtype: the trainer picks the compute precision.
        return T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise PipelineDefinitionError(
            f"{argument} {str(path)!r} could not be loaded as a T5 model: {exc}"
        ) from exc


def _check_vocab(config: Any, vocab_size: int, path: str, argument: str) -> None:
    if config.vocab_size < vocab_size:
        raise PipelineDefinitionError(
            f"{argument} {path!r} has {config.vocab_size} token embeddings, fewer than the "
            f"tokenizer's {vocab_size} tokens; pass the tokenizer the model was trained with "
            "(tokenizer_path=)"
        )


# ----------------------------------------------------------------------- data
def _split(
    n_rows: int, n_val: int, n_train: int | None, seed: int, source: DataSource
) -> tuple[list[int], list[int]]:
    """Validation and training row indices: a seeded permutation, validation first."""
    needed = n_val + (n_train if n_train is not None else 1)
    if n_rows < needed:
        raise PipelineDefinitionError(
            f"data_path {source.location!r} has {n_rows} rows; n_val={n_val} and "
            f"n_train={n_train} need at least {needed}"
        )
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    end = n_val + n_train if n_train is not None else n_rows
    return order[:n_val], order[n_val:end]


def _load_tokenizer(path: str | None) -> PreTrainedTokenizerBase:
    if path is None:
        return ByT5Tokenizer()  # byte-level: no vocabulary file, no download
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise PipelineDefinitionError(
            f"tokenizer_path {path!r} could not be loaded as a tokenizer: {exc}"
        ) from exc
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise PipelineDefinitionError(
            f"tokenizer_path {path!r}: the tokenizer needs a pad and an eos token (T5's have both)"
        )
    return tokenizer


# ------------------------------------------------------------ build arguments
def _existing(path: str | Path | None, argument: str) -> str | None:
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise FileNotFoundError(f"{argument} {str(path)!r} does not exist or is not a directory")
    return str(resolved)


def _dir_fingerprint(path: str | None) -> str | None:
    """``config.json``'s bytes and every file's name and size, hashed (weights unread)."""
    import hashlib

    if path is None:
        return None
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(f for f in root.rglob("*") if f.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}:{file.stat().st_size}\n".encode())
    config = root / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:16]


def _model_config(path: str, argument: str) -> T5Config:
    config_file = Path(path) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise PipelineDefinitionError(
            f"{argument} {path!r} holds no readable config.json (a save_pretrained "
            f"directory has one): {exc}"
        ) from exc
    if model_type not in ("t5", "mt5"):
        raise PipelineDefinitionError(
            f"{argument} {path!r} holds a {model_type!r} model; this pipeline needs T5 "
            "(model_type 't5' or 'mt5' in config.json)"
        )
    return T5Config.from_pretrained(path)


def build_pipeline(
    data_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    teacher_path: str | Path | None = None,
    student_path: str | Path | None = None,
    size: str = "tiny",
    n_train: int | None = 256,
    n_val: int = 64,
    max_epochs: int = 8,
    distill_epochs: int = 1,
    student_init: str = "teacher",
    workers: int | None = None,
    use_gpu: bool = False,
) -> Pipeline:
    """The T5 teacher fine-tuning and distillation pipeline: six stages, the first
    five cached (their hyperparameters and outputs: :mod:`eeipu_ray.pipelines.t5`).

    Args:
        data_path: A ``.jsonl``, ``.csv`` or ``.parquet`` file or a
            ``save_to_disk`` directory with ``source`` and ``target`` columns
            (a ``DatasetDict``'s ``train`` split), or a Hugging Face Hub dataset
            id (needs the network: refused under ``HF_HUB_OFFLINE``); ``None``
            uses the shipped toy set (600 pairs).
        tokenizer_path: A ``save_pretrained`` tokenizer directory. ``None``: the
            teacher's directory when it holds a tokenizer, else a byte-level
            ``ByT5Tokenizer`` (no files needed).
        teacher_path: A ``save_pretrained`` T5 model directory to fine-tune;
            ``None`` builds a fresh teacher of shape ``size``.
        student_path: A ``save_pretrained`` T5 model directory (the teacher's
            vocabulary) to start the student from; ``None``: half the teacher's.
        size: Shape of a fresh teacher, a key of :data:`SIZES`.
        n_train: Training pairs used (``None``: every pair not held out).
        n_val: Validation pairs held out (scored by ROUGE).
        max_epochs: Upper end of the teacher's ``num_train_epochs`` range (which
            starts at a quarter of it).
        distill_epochs: Epochs of every distillation segment (a constant).
        student_init: How segment 1 initializes a student derived from the
            teacher: ``"teacher"`` (its embeddings and every other block) or
            ``"random"`` (seeded). Ignored with ``student_path``.
        workers: Ray Train workers per trial that train the teacher and the
            students data-parallel (``batch_size`` rows each per step; see
            :func:`eeipu_ray.hf.trainer_stage`). ``None``: the trial trains.
        use_gpu: One GPU per Ray Train worker (with ``workers``).

    Raises:
        FileNotFoundError: a path that does not exist (named).
        PipelineDefinitionError: data without ``source``/``target``, a hub id
            offline, a model directory without a T5 config, a tokenizer larger
            than the teacher's vocabulary, or a bad number (each named).

    Example:
        >>> pipeline = build_pipeline(data_path="pairs.csv", n_train=1000)  # doctest: +SKIP
        >>> pipeline.run(config).output["score"]  # doctest: +SKIP
    """
    from ray import tune

    _check_settings(size, student_init, n_train, n_val, max_epochs, distill_epochs)
    source = resolve_source(data_path)
    pairs = load_pairs(source)  # fail now, not in the first trial
    _split(len(pairs), n_val, n_train, 0, source)
    teacher_dir, student_dir, tokenizer_dir = _model_dirs(
        teacher_path, student_path, tokenizer_path
    )
    data_space = _data_space(source, pairs, data_path, tokenizer_dir, n_train, n_val)
    teacher_space = _teacher_space(teacher_dir, size, max_epochs)
    trained = {"workers": workers, "use_gpu": use_gpu}
    stages = [
        Stage("data", _Contained(_data), data_space, version=VERSION),
        _training_stage("teacher", _build_teacher, teacher_space, _teacher_output, **trained),
    ]
    for segment in range(1, 4):
        space = _distill_space(segment, distill_epochs, student_dir, student_init)
        stages.append(
            _training_stage(f"distill{segment}", _build_distill, space, _distill_output, **trained)
        )
    beams = {"num_beams": tune.choice([1, 2, 4])}
    stages.append(Stage("evaluate", _Contained(_evaluate), beams, version=VERSION))
    return Pipeline("t5", stages)


def _check_settings(
    size: str,
    student_init: str,
    n_train: int | None,
    n_val: int,
    max_epochs: int,
    distill_epochs: int,
) -> None:
    """Refuse a bad :func:`build_pipeline` setting, naming it."""
    if size not in SIZES:
        raise PipelineDefinitionError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if student_init not in ("teacher", "random"):
        raise PipelineDefinitionError(
            f"student_init must be 'teacher' or 'random', got {student_init!r}"
        )
    for name, value, low in (
        ("n_val", n_val, 1),
        ("max_epochs", max_epochs, 1),
        ("distill_epochs", distill_epochs, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise PipelineDefinitionError(f"{name} must be an int >= {low}, got {value!r}")
    if n_train is not None and (
        not isinstance(n_train, int) or isinstance(n_train, bool) or n_train < 1
    ):
        raise PipelineDefinitionError(f"n_train must be None or an int >= 1, got {n_train!r}")


def _model_dirs(
    teacher_path: str | Path | None,
    student_path: str | Path | None,
    tokenizer_path: str | Path | None,
) -> tuple[str | None, str | None, str | None]:
    """The teacher, student and tokenizer directories, checked against each other.

    The tokenizer defaults to the teacher's directory when it holds one.
    """
    teacher_dir = _existing(teacher_path, "teacher_path")
    student_dir = _existing(student_path, "student_path")
    tokenizer_dir = _existing(tokenizer_path, "tokenizer_path")
    if (
        tokenizer_dir is None
        and teacher_dir
        and (Path(teacher_dir) / "tokenizer_config.json").is_file()
    ):
        tokenizer_dir = teacher_dir
    vocab_size = len(_load_tokenizer(tokenizer_dir))
    teacher_config = None
    if teacher_dir is not None:
        teacher_config = _model_config(teacher_dir, "teacher_path")
        _check_vocab(teacher_config, vocab_size, teacher_dir, "teacher_path")
    if student_dir is not None:
        student_config = _model_config(student_dir, "student_path")
        _check_vocab(student_config, vocab_size, student_dir, "student_path")
        teacher_vocab = teacher_config.vocab_size if teacher_config else vocab_size
        if student_config.vocab_size != teacher_vocab:
            raise PipelineDefinitionError(
                f"student_path {student_dir!r} has a vocabulary of {student_config.vocab_size}, "
                f"the teacher one of {teacher_vocab}; distillation needs the same vocabulary"
            )
    return teacher_dir, student_dir, tokenizer_dir


def _data_space(
    source: DataSource,
    pairs: Any,
    data_path: str | Path | None,
    tokenizer_dir: str | None,
    n_train: int | None,
    n_val: int,
) -> dict[str, Any]:
    """The ``data`` stage's search space: the sequence lengths and batch size, and
    the data and tokenizer as constants (so they enter every prefix key)."""
    from ray import tune

    return {
        "source_len": tune.choice([32, 48, 64]),
        "target_len": tune.choice([24, 32, 40]),
        "batch_size": tune.choice([8, 16, 32]),
        "data_path": source.location if data_path is not None else None,
        "data_fingerprint": fingerprint(source, pairs),
        "tokenizer_path": tokenizer_dir,
        "tokenizer_fingerprint": _dir_fingerprint(tokenizer_dir),
        "n_train": n_train,
        "n_val": n_val,
        "seed": 0,
    }


def _teacher_space(teacher_dir: str | None, size: str, max_epochs: int) -> dict[str, Any]:
    """The ``teacher`` stage's search space (``Seq2SeqTrainingArguments`` names)."""
    from ray import tune

    return {
        "learning_rate": tune.loguniform(5e-4, 1e-2),
        "weight_decay": tune.loguniform(1e-4, 1e-1),
        "num_train_epochs": tune.randint(max(1, max_epochs // 4), max_epochs + 1),
        "model_path": teacher_dir,
        "model_fingerprint": _dir_fingerprint(teacher_dir),
        "size": size if teacher_dir is None else None,
        "seed": 0,
    }


def _distill_space(
    segment: int, distill_epochs: int, student_dir: str | None, student_init: str
) -> dict[str, Any]:
    """The search space of distillation segment ``segment`` (1, 2 or 3); segment 1's
    also says where the student starts."""
    from ray import tune

    space = {
        "learning_rate": tune.loguniform(5e-4, 1e-2),
        "temperature": tune.uniform(1.0, 4.0),
        "weight_decay": tune.loguniform(1e-4, 1e-1),
        "num_train_epochs": distill_epochs,
        "alpha": ALPHA,  # documents the constant in every trial's config
        "seed": segment,
    }
    if segment == 1:
        space["model_path"] = student_dir
        space["model_fingerprint"] = _dir_fingerprint(student_dir)
        space["student_init"] = student_init if student_dir is None else None
    return space
