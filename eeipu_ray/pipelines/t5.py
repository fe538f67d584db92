"""A real T5 pipeline: fine-tune a teacher, distill a student in three segments, score ROUGE.

Shaped like the T5 pipeline of the EEIPU paper (Essofi et al., arXiv
2411.03731): six stages whose outputs are cached, so trials that agree on the
data, the teacher and the first distillation segments share a long prefix.

1. ``data``: read ``source``/``target`` pairs (the shipped toy set, or the
   user's JSONL, CSV or Parquet file), hold out ``n_val`` pairs for validation
   (a seeded permutation), keep up to ``n_train`` of the rest for training, and
   tokenize both sides, truncating to ``source_len`` and ``target_len`` tokens
   (labels padded with -100). ``batch_size`` is chosen here and used by every
   training stage.
2. ``teacher``: fine-tune a ``T5ForConditionalGeneration`` with AdamW (``lr``,
   ``weight_decay``) for ``epochs`` epochs, cross-entropy on the targets. The
   model comes from ``teacher_path`` (``save_pretrained`` directory) or is
   built from a ``T5Config`` of the chosen ``size``. Usually the most expensive
   stage.
3. ``distill1``, ``distill2``, ``distill3``: train a smaller student for a
   fixed ``epochs`` each, with its own ``lr``, ``weight_decay`` and
   ``temperature`` per segment, on the knowledge-distillation loss (Hinton et
   al. 2015) over the non-padding target positions::

       L = alpha * CE(student, labels)
           + (1 - alpha) * T**2 * KL(softmax(teacher / T) || softmax(student / T))

   with ``alpha`` = :data:`ALPHA` (a constant of the space). Segment 1 creates
   the student: from ``student_path``, or as the teacher with half its layers
   (at least one per stack) whose weights are the teacher's embeddings and
   every other block (``student_init="teacher"``, DistilBERT-style), or a
   seeded random initialization (``student_init="random"``). Segments 2 and 3
   continue from the previous segment's student weights with a fresh AdamW
   (optimizer moments are not carried across segments: that would double the
   size of every cached segment).
4. ``evaluate``: generate a summary of every validation source with the
   student (greedy, or beam search with ``num_beams`` beams; at most
   ``target_len`` new tokens) and score it against the full reference with
   ROUGE (``rouge_score``): ``score`` is the mean ROUGE-L F1, ``rouge1`` the
   mean ROUGE-1 F1.

Stage outputs are dicts of tensors (stored as safetensors) and plain values;
every model travels as ``{"state_dict": CPU tensors, "config": dict}``.

Importing this module (``transformers``) takes a few seconds once per
process, outside every stage. Stage times at the defaults are in
docs/benchmarks.md.

Devices and precision: every training and generation step runs on
``ctx.device`` (``"cpu"`` or ``"cuda:N"``). On CUDA the forward passes run
under autocast in bfloat16 where the GPU supports it, else in float16 with a
gradient scaler; on the CPU in float32. Gradients are clipped to norm
:data:`MAX_GRAD_NORM`.

Determinism: the split, weight initialization, dropout and batch order are all
seeded, inside :func:`torch.random.fork_rng` (a stage leaves the global RNG as
it found it), so on the CPU, with the same number of threads, a config always
gives the same score. On a GPU some kernels are nondeterministic.

Known limitations:

* The teacher's weights are part of every distillation segment's output (each
  segment needs the teacher, and a cache entry must be self-contained), so
  every cached ``teacher`` and ``distill`` entry holds a copy of them: a trial
  that computes those four stages stores the teacher four times. With a
  pretrained ``t5-base`` teacher (~900 MB in float32) that is several GB per
  trial. Give the cache a byte budget (``--cache-budget``), or distill from a
  small teacher.
* Local paths (``data_path``, ``tokenizer_path``, ``teacher_path``,
  ``student_path``) are read by whichever worker runs the stage: on a cluster
  they must exist at the same path on every node.
* The data file enters the prefix key through a hash of its bytes, but a model
  or tokenizer directory only through its ``config.json`` and the names and
  sizes of its files: replacing the weights in place with others of the same
  size reuses stale cache entries. Write new weights to a new directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# The first optimizer a process builds imports torch._dynamo (~2 s on one core);
# transformers and rouge_score take a few seconds more. Import them with this
# module, so that they are not charged to the first trial's stages.
import torch._dynamo
import torch.nn.functional as F

try:
    from rouge_score.rouge_scorer import RougeScorer
    from transformers import (
        AutoTokenizer,
        ByT5Tokenizer,
        PreTrainedTokenizerBase,
        T5Config,
        T5ForConditionalGeneration,
    )
except ImportError as exc:  # dependencies of this pipeline only
    raise ImportError(
        f"the t5 pipeline needs transformers and rouge-score ({exc.name} is missing): "
        "pip install 'transformers>=4.56' rouge-score"
    ) from exc

from eeipu_ray.errors import PipelineDefinitionError
from eeipu_ray.pipeline import Pipeline, Stage, StageContext

DEFAULT_DATA = Path(__file__).with_name("data") / "t5_toy.jsonl"
"""The shipped toy set (made by ``data/make_t5_toy.py``): 600 news sentences and headlines."""

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

DATA_SUFFIXES = {".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_BATCH_SIZE = 64
IGNORE_INDEX = -100


# ---------------------------------------------------------------------- stages
def _data(_: None, p: dict[str, Any]) -> dict[str, Any]:
    path = Path(p["data_path"]) if p["data_path"] is not None else DEFAULT_DATA
    sources, targets = read_pairs(path)
    val_idx, train_idx = _split(len(sources), p["n_val"], p["n_train"], p["seed"], path)
    tokenizer = _load_tokenizer(p["tokenizer_path"])

    def encode(idx: list[int]) -> dict[str, torch.Tensor]:
        return _encode(
            tokenizer,
            [sources[i] for i in idx],
            [targets[i] for i in idx],
            p["source_len"],
            p["target_len"],
        )

    val = encode(val_idx)
    return {
        "train": encode(train_idx),
        "val": {"input_ids": val["input_ids"], "attention_mask": val["attention_mask"]},
        # Full references: a short target_len is scored against what it cut off.
        "val_targets": [targets[i] for i in val_idx],
        "run": {
            "batch_size": int(p["batch_size"]),
            "target_len": int(p["target_len"]),
            "tokenizer_path": p["tokenizer_path"],
            "vocab_size": len(tokenizer),
            "pad_token_id": int(tokenizer.pad_token_id),
            "eos_token_id": int(tokenizer.eos_token_id),
        },
    }


def _teacher(data: dict[str, Any], p: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    device = torch.device(ctx.device)
    run = data["run"]
    with _seeded(p["seed"], device):
        if p["model_path"] is not None:
            model = _pretrained(p["model_path"], "teacher_path")
            _check_vocab(model.config, run["vocab_size"], p["model_path"], "teacher_path")
        else:
            model = T5ForConditionalGeneration(_scratch_config(p["size"], run))
        model.to(device)

        def loss_fn(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            logits = _logits(model, batch)
            return {"loss": _token_cross_entropy(logits, batch["labels"])}

        _fit(model, loss_fn, data["train"], p, run["batch_size"], p["seed"], ctx)
    return {
        "teacher": _export(model),
        "train": data["train"],
        "val": data["val"],
        "val_targets": data["val_targets"],
        "run": run,
    }


def _distill(inputs: dict[str, Any], p: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    device = torch.device(ctx.device)
    temperature, alpha = float(p["temperature"]), float(p["alpha"])
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {p['temperature']!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {p['alpha']!r}")
    with _seeded(p["seed"], device):
        teacher = _restore(inputs["teacher"]).to(device).eval()
        teacher.requires_grad_(False)
        if "student" in inputs:  # segments 2, 3: continue
            student = _restore(inputs["student"])
        else:  # segment 1: create
            student = _new_student(teacher, p, inputs["run"]["vocab_size"])
        student.to(device)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise PipelineDefinitionError(
                f"the student's vocabulary ({student.config.vocab_size}) differs from the "
                f"teacher's ({teacher.config.vocab_size}); distillation compares their "
                "output distributions token by token, so they must be equal"
            )

        def loss_fn(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                teacher_logits = _logits(teacher, batch)
            student_logits = _logits(student, batch)
            return _kd_loss(student_logits, teacher_logits, batch["labels"], temperature, alpha)

        _fit(student, loss_fn, inputs["train"], p, inputs["run"]["batch_size"], p["seed"], ctx)
    return {
        "teacher": inputs["teacher"],
        "student": _export(student),
        "train": inputs["train"],
        "val": inputs["val"],
        "val_targets": inputs["val_targets"],
        "run": inputs["run"],
    }


def _evaluate(distilled: dict[str, Any], p: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    num_beams = int(p["num_beams"])
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {p['num_beams']!r}")
    device = torch.device(ctx.device)
    run = distilled["run"]
    tokenizer = _load_tokenizer(run["tokenizer_path"])
    val = distilled["val"]
    with _seeded(0, device):  # generation draws nothing; construction does
        model = _restore(distilled["student"])
    model.to(device).eval()
    autocast, _ = _precision(device)
    predictions: list[str] = []
    n = len(val["input_ids"])
    with torch.no_grad():
        for start in range(0, n, EVAL_BATCH_SIZE):
            batch = _batch(val, torch.arange(start, min(start + EVAL_BATCH_SIZE, n)), device)
            with autocast():
                generated = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    max_new_tokens=run["target_len"],
                    num_beams=num_beams,
                    do_sample=False,
                )
            predictions += tokenizer.batch_decode(generated, skip_special_tokens=True)
    scorer = RougeScorer(["rouge1", "rougeL"])
    scores = [
        scorer.score(reference, prediction)
        for reference, prediction in zip(distilled["val_targets"], predictions, strict=True)
    ]
    return {
        "score": sum(s["rougeL"].fmeasure for s in scores) / len(scores),
        "rouge1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
    }


# ------------------------------------------------------------------- training
def _fit(
    model: T5ForConditionalGeneration,
    loss_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    train: Mapping[str, torch.Tensor],
    p: Mapping[str, Any],
    batch_size: int,
    seed: int,
    ctx: StageContext,
) -> None:
    """``p["epochs"]`` epochs of AdamW on ``loss_fn(batch)["loss"]``, reporting the
    per-example mean of every entry of ``loss_fn``'s output after each epoch."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    autocast, scaler = _precision(device)
    order_rng = torch.Generator().manual_seed(seed)
    train = {k: v.to(device) for k, v in train.items()}
    n = len(train["labels"])
    model.train()
    for epoch in range(1, int(p["epochs"]) + 1):
        order = torch.randperm(n, generator=order_rng)
        totals: dict[str, torch.Tensor] = {}
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            with autocast():
                losses = loss_fn(_batch(train, idx, device))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:  # float16: scale against underflow, unscale to clip
                scaler.scale(losses["loss"]).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                scaler.step(optimizer)
                scaler.update()
            else:
                losses["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                optimizer.step()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() * len(idx)
        ctx.report(epoch=epoch, **{k: float(v) / n for k, v in totals.items()})
    model.eval()


def _logits(model: T5ForConditionalGeneration, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Decoder logits ``b x t x vocab`` under teacher forcing.

    The decoder reads the labels shifted right behind the start token (what T5
    does with ``labels=``), without computing T5's own loss.
    """
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
    ).logits


def _token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the target positions that are not padding (-100)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
    )


def _kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float = 0.5,
) -> dict[str, torch.Tensor]:
    """The distillation loss of the module docstring, averaged over target tokens.

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


def _batch(
    tensors: Mapping[str, torch.Tensor], idx: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every tensor, with the columns that are padding in all rows cut off."""
    rows = {k: v[idx.to(v.device)].to(device) for k, v in tensors.items()}
    width = int(rows["attention_mask"].sum(dim=1).max())
    rows["input_ids"] = rows["input_ids"][:, :width].contiguous()
    rows["attention_mask"] = rows["attention_mask"][:, :width].contiguous()
    if "labels" in rows:
        length = int((rows["labels"] != IGNORE_INDEX).sum(dim=1).max())
        rows["labels"] = rows["labels"][:, :length].contiguous()
    return rows


def _precision(
    device: torch.device,
) -> tuple[Callable[[], contextlib.AbstractContextManager[Any]], torch.amp.GradScaler | None]:
    """Autocast factory and gradient scaler for ``device``: bf16 autocast on CUDA
    where supported, else fp16 with a scaler; fp32 (no autocast) on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext, None
    if torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16), None
    return lambda: torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch (init, dropout) for the block and restore the global RNG after it:
    a stage must not change what the code around it draws next."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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
    blocks, initialized from the teacher (``p["student_init"] == "teacher"``) or at random
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


def _export(model: T5ForConditionalGeneration) -> dict[str, Any]:
    """``{"state_dict": CPU tensors, "config": JSON-safe dict}``, what the cache stores."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": json.loads(model.config.to_json_string()),
    }


def _restore(exported: Mapping[str, Any]) -> T5ForConditionalGeneration:
    """The model :func:`_export` describes, on the CPU (call inside :func:`_seeded`)."""
    model = T5ForConditionalGeneration(T5Config.from_dict(exported["config"]))
    model.load_state_dict(exported["state_dict"])
    return model


def _pretrained(path: str, argument: str) -> T5ForConditionalGeneration:
    try:
        # float32 whatever the checkpoint's dtype: autocast picks the compute precision.
        return T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise PipelineDefinitionError(
            f"{argument} {path!r} could not be loaded as a T5 model: {exc}"
        ) from exc


def _check_vocab(config: Any, vocab_size: int, path: str, argument: str) -> None:
    if config.vocab_size < vocab_size:
        raise PipelineDefinitionError(
            f"{argument} {path!r} has {config.vocab_size} token embeddings, fewer than the "
            f"tokenizer's {vocab_size} tokens; pass the tokenizer the model was trained with "
            "(tokenizer_path=)"
        )


# ----------------------------------------------------------------------- data
def read_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """The ``source`` and ``target`` columns of a JSONL, CSV or Parquet file, as strings.

    Other columns are ignored; numbers are turned into their text.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PipelineDefinitionError: naming the file when its format is unknown or
            unreadable, a column is missing (naming it), a value is missing or
            blank (naming the column and row), or it has no rows.
    """
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist or is not a file")
    fmt = DATA_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise PipelineDefinitionError(
            f"data file {str(path)!r}: unknown format {path.suffix!r}; use "
            f"{', '.join(sorted(DATA_SUFFIXES))} (JSON Lines, CSV or Parquet)"
        )
    try:
        if fmt == "json":
            import pyarrow.json as pa_json

            table = pa_json.read_json(path)
        elif fmt == "csv":
            import pyarrow.csv as pa_csv

            table = pa_csv.read_csv(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineDefinitionError(
            f"data file {str(path)!r} could not be read as {fmt}: {exc}"
        ) from exc
    columns: list[list[str]] = []
    for name in ("source", "target"):
        if name not in table.column_names:
            raise PipelineDefinitionError(
                f"data file {str(path)!r} has no {name!r} column (columns: "
                f"{table.column_names}); it needs 'source' and 'target'"
            )
        try:
            values = table.column(name).cast(pa.string()).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise PipelineDefinitionError(
                f"data file {str(path)!r}: column {name!r} cannot be read as text: {exc}"
            ) from exc
        blank = next((i for i, v in enumerate(values) if v is None or not v.strip()), None)
        if blank is not None:
            raise PipelineDefinitionError(
                f"data file {str(path)!r}: column {name!r} is missing or empty in row {blank} "
                "(0-based, header not counted); every row needs a source and a target"
            )
        columns.append(values)
    if not columns[0]:
        raise PipelineDefinitionError(f"data file {str(path)!r} has no rows")
    return columns[0], columns[1]


def _split(
    n_rows: int, n_val: int, n_train: int | None, seed: int, path: Path
) -> tuple[list[int], list[int]]:
    """Validation and training row indices: a seeded permutation, validation first."""
    needed = n_val + (n_train if n_train is not None else 1)
    if n_rows < needed:
        raise PipelineDefinitionError(
            f"data file {str(path)!r} has {n_rows} rows; n_val={n_val} and n_train={n_train} "
            f"need at least {needed}"
        )
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    end = n_val + n_train if n_train is not None else n_rows
    return order[:n_val], order[n_val:end]


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    targets: Sequence[str],
    source_len: int,
    target_len: int,
) -> dict[str, torch.Tensor]:
    """Token ids and mask of the sources, and labels (-100 at padding) of the targets."""
    source = tokenizer(
        list(sources), max_length=source_len, truncation=True, padding=True, return_tensors="pt"
    )
    target = tokenizer(
        list(targets), max_length=target_len, truncation=True, padding=True, return_tensors="pt"
    )
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE_INDEX)
    return {
        "input_ids": source["input_ids"].contiguous(),
        "attention_mask": source["attention_mask"].contiguous(),
        "labels": labels.contiguous(),
    }


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
def _existing(path: str | Path | None, argument: str, *, directory: bool = False) -> str | None:
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if directory and not resolved.is_dir():
        raise FileNotFoundError(f"{argument} {str(path)!r} does not exist or is not a directory")
    if not resolved.exists():
        raise FileNotFoundError(f"{argument} {str(path)!r} does not exist")
    return str(resolved)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _dir_fingerprint(path: str | None) -> str | None:
    """``config.json``'s bytes and every file's name and size, hashed (weights unread)."""
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
) -> Pipeline:
    """The T5 teacher fine-tuning and distillation pipeline.

    Args:
        data_path: A ``.jsonl``, ``.csv`` or ``.parquet`` file with ``source`` and
            ``target`` columns; ``None`` uses the shipped toy set (600 pairs).
        tokenizer_path: A ``save_pretrained`` tokenizer directory. ``None``: the
            teacher's directory when it holds a tokenizer, else a byte-level
            ``ByT5Tokenizer`` (no files needed).
        teacher_path: A ``save_pretrained`` T5 model directory to fine-tune;
            ``None`` builds a fresh teacher of shape ``size``.
        student_path: A ``save_pretrained`` T5 model directory to start the
            student from; ``None`` derives it from the teacher (half the layers).
            Its vocabulary must be the teacher's.
        size: Shape of a fresh teacher, a key of :data:`SIZES`.
        n_train: Training pairs used (``None``: every pair not held out).
        n_val: Validation pairs held out (scored by ROUGE).
        max_epochs: Upper end of the teacher's ``epochs`` range (which starts at
            a quarter of it).
        distill_epochs: Epochs of every distillation segment (a constant).
        student_init: How segment 1 initializes a student derived from the
            teacher: ``"teacher"`` (its embeddings and every other block) or
            ``"random"`` (seeded). Ignored with ``student_path``.

    At the defaults a full trial takes seconds on one CPU core (stage times:
    docs/benchmarks.md); tests pass smaller values.

    Raises:
        FileNotFoundError: a path that does not exist (named).
        PipelineDefinitionError: a data file without ``source``/``target`` (file
            and column named), a model directory without a T5 config, a tokenizer
            with more tokens than the teacher has embeddings, or a bad number.

    Example:
        >>> pipeline = build_pipeline(data_path="pairs.csv", n_train=1000)  # doctest: +SKIP
        >>> pipeline.run(config).output["score"]  # doctest: +SKIP
    """
    from ray import tune

    _check_settings(size, student_init, n_train, n_val, max_epochs, distill_epochs)
    data_file = Path(_existing(data_path, "data_path")) if data_path is not None else DEFAULT_DATA
    sources, _ = read_pairs(data_file)  # fail now, not in the first trial
    _split(len(sources), n_val, n_train, 0, data_file)
    teacher_dir, student_dir, tokenizer_dir = _model_dirs(
        teacher_path, student_path, tokenizer_path
    )
    low_epochs = max(1, max_epochs // 4)
    data_space = {
        "source_len": tune.choice([32, 48, 64]),
        "target_len": tune.choice([24, 32, 40]),
        "batch_size": tune.choice([8, 16, 32]),
        "data_path": str(data_file) if data_path is not None else None,
        "data_sha256": _file_digest(data_file),
        "tokenizer_path": tokenizer_dir,
        "tokenizer_fingerprint": _dir_fingerprint(tokenizer_dir),
        "n_train": n_train,
        "n_val": n_val,
        "seed": 0,
    }
    teacher_space = {
        "lr": tune.loguniform(5e-4, 1e-2),
        "weight_decay": tune.loguniform(1e-4, 1e-1),
        "epochs": tune.randint(low_epochs, max_epochs + 1),
        "model_path": teacher_dir,
        "model_fingerprint": _dir_fingerprint(teacher_dir),
        "size": size if teacher_dir is None else None,
        "seed": 0,
    }
    stages = [Stage("data", _data, data_space), Stage("teacher", _teacher, teacher_space)]
    for segment in range(1, 4):
        space = _distill_space(segment, distill_epochs)
        if segment == 1:
            space.update(
                {
                    "model_path": student_dir,
                    "model_fingerprint": _dir_fingerprint(student_dir),
                    "student_init": student_init if student_dir is None else None,
                }
            )
        stages.append(Stage(f"distill{segment}", _distill, space))
    stages.append(Stage("evaluate", _evaluate, {"num_beams": tune.choice([1, 2, 4])}))
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
    teacher_dir = _existing(teacher_path, "teacher_path", directory=True)
    student_dir = _existing(student_path, "student_path", directory=True)
    tokenizer_dir = _existing(tokenizer_path, "tokenizer_path", directory=True)
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


def _distill_space(segment: int, distill_epochs: int) -> dict[str, Any]:
    """The search space of distillation segment ``segment`` (1, 2 or 3)."""
    from ray import tune

    return {
        "lr": tune.loguniform(5e-4, 1e-2),
        "temperature": tune.uniform(1.0, 4.0),
        "weight_decay": tune.loguniform(1e-4, 1e-1),
        "epochs": distill_epochs,
        "alpha": ALPHA,  # documents the constant in every trial's config
        "seed": segment,
    }
