"""Hugging Face ``Trainer`` set-ups as pipeline stages.

:func:`trainer_stage` turns the code that builds a ``transformers.Trainer``
(or ``Seq2SeqTrainer``) into a :class:`~eeipu_ray.pipeline.Stage`: the
stage's hyperparameters that are ``TrainingArguments`` fields (``learning_rate``,
``num_train_epochs``, ``weight_decay``, ...) go into the arguments, the others
reach the builder; the previous stage's output (a ``datasets.Dataset``, a
model directory, ...) comes in; the trained model is saved with
``save_pretrained`` and its directory goes out, so the prefix cache stores it
and a later trial that shares the prefix starts from it. The trainer's logs
reach Ray Tune as intermediate results, and the stage's own evaluation
metrics are part of its output.

With ``num_workers``, the stage trains data-parallel on Ray Train workers
(:func:`eeipu_ray.train.train_stage`, charged wall time times the workers):
every worker calls the builder (it must be picklable: a module-level function)
and trains its shard through the ``Trainer``'s own distributed support; rank
0's trained model comes back to the trial, which saves it.

Example::

    from transformers import T5ForConditionalGeneration, Seq2SeqTrainer

    def build(inputs, args, hp, ctx):
        model = T5ForConditionalGeneration.from_pretrained(inputs["model_dir"])
        return Seq2SeqTrainer(model=model, args=args, train_dataset=inputs["train"],
                              eval_dataset=inputs["validation"])

    finetune = trainer_stage("finetune", build,
                             {"learning_rate": tune.loguniform(1e-5, 1e-3), "dropout": 0.1},
                             args={"per_device_train_batch_size": 8}, seq2seq=True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    from transformers import (
        Seq2SeqTrainingArguments,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
except ImportError as exc:  # an optional dependency
    raise ImportError(
        f"eeipu_ray.hf needs transformers and accelerate ({exc.name} is missing): "
        "pip install 'eeipu-ray[hf]'"
    ) from exc

from eeipu_ray.errors import PipelineDefinitionError
from eeipu_ray.pipeline import Stage, StageContext

TrainerBuilder = Callable[[Any, TrainingArguments, dict[str, Any], StageContext], Trainer]
"""``build(inputs, args, hyperparameters, ctx) -> Trainer``."""

OWNED_ARGS = ("output_dir",)
"""``TrainingArguments`` fields the stage sets itself: the trainer writes into the trial's
scratch directory, and the model it keeps is the stage's output."""

_DEFAULT_ARGS: dict[str, Any] = {
    "report_to": [],  # Tune gets the logs through the stage's callback
    "save_strategy": "no",  # the trained model is the stage's output, saved once
    "disable_tqdm": True,
}


def trainer_stage(
    name: str,
    build: TrainerBuilder,
    space: Mapping[str, Any],
    *,
    args: Mapping[str, Any] | None = None,
    seq2seq: bool = False,
    evaluate: bool = True,
    output: Callable[[Any, Path, dict[str, float]], Any] | None = None,
    num_workers: int | None = None,
    use_gpu: bool = False,
    version: str = "1",
) -> Stage:
    """A stage that trains with a Hugging Face ``Trainer``.

    Args:
        name: The stage's name.
        build: ``build(inputs, args, hyperparameters, ctx)`` returns the
            ``Trainer`` (model, datasets, collator, ...) for this stage's
            ``args`` (``TrainingArguments``, or ``Seq2SeqTrainingArguments``
            with ``seq2seq=True``). ``hyperparameters`` are all of the stage's,
            ``TrainingArguments`` fields included.
        space: The stage's search space (Tune domains or constants). Keys that
            are ``TrainingArguments`` fields set them.
        args: Fixed ``TrainingArguments`` fields. A key may not be both here
            and in ``space``; ``output_dir`` is the stage's own.
        seq2seq: Build ``Seq2SeqTrainingArguments``.
        evaluate: After training, run ``trainer.evaluate()`` when the trainer
            has an evaluation dataset, and keep its metrics.
        output: ``output(inputs, model_dir, metrics)`` makes the stage's output
            (default ``{"model_dir": model_dir, "metrics": metrics}``); the
            ``save_model`` directory is cached with it when it is part of it.
        num_workers: Train data-parallel on this many Ray Train workers (see
            the module's description). ``None`` (default): the trial trains.
        use_gpu: One GPU per Ray Train worker (with ``num_workers``).
        version: The stage's version (bump it when ``build`` changes). With
            ``num_workers``, the worker count is appended to it.

    Returns:
        The :class:`~eeipu_ray.pipeline.Stage`.

    Raises:
        PipelineDefinitionError: a key of ``args`` names no ``TrainingArguments``
            field, is also in ``space``, or is owned by the stage.
    """
    args_class = Seq2SeqTrainingArguments if seq2seq else TrainingArguments
    fixed = dict(args or {})
    fields = _argument_fields(args_class)
    _check_definition(name, build, space, fixed, args_class, fields)

    recipe = _Recipe(build, args_class, fields, fixed, evaluate)

    def finish(inputs: Any, model_dir: Path, metrics: dict[str, float], ctx: StageContext) -> Any:
        ctx.report(**metrics)
        if output is None:
            return {"model_dir": model_dir, "metrics": metrics}
        return output(inputs, model_dir, metrics)

    def run(inputs: Any, params: dict[str, Any], ctx: StageContext) -> Any:
        trainer, metrics = recipe.train(inputs, params, ctx, TuneProgress(ctx))
        model_dir = ctx.trial_dir / f"{ctx.stage}-model"
        trainer.save_model(str(model_dir))
        return finish(inputs, model_dir, metrics, ctx)

    if num_workers is None:
        return Stage(name, run, dict(space), version=version)

    from eeipu_ray.train import train_stage

    inner = train_stage(
        name,
        functools.partial(_train_on_worker, name, recipe),
        space,
        num_workers=num_workers,
        use_gpu=use_gpu,
        version=version,
    )

    return Stage(name, _OnWorkers(inner.fn, finish), dict(space), version=inner.version)


def _check_definition(
    name: str,
    build: Any,
    space: Mapping[str, Any],
    fixed: Mapping[str, Any],
    args_class: type,
    fields: frozenset[str],
) -> None:
    """Refuse a trainer stage's fixed arguments, space or builder, naming the culprit."""
    for key in fixed:
        if key in OWNED_ARGS:
            raise PipelineDefinitionError(
                f"stage {name!r}: args[{key!r}] is set by the stage (the trainer writes "
                "into the trial's scratch directory; the saved model is the output)"
            )
        if key not in fields:
            raise PipelineDefinitionError(
                f"stage {name!r}: args[{key!r}] is not a field of {args_class.__name__}"
            )
        if key in space:
            raise PipelineDefinitionError(
                f"stage {name!r}: {key!r} is both a fixed argument and in the search space"
            )
    owned = [key for key in space if key in OWNED_ARGS]
    if owned:
        raise PipelineDefinitionError(
            f"stage {name!r}: space[{owned[0]!r}] is set by the stage, not searched"
        )
    if not callable(build):
        raise PipelineDefinitionError(f"stage {name!r}: build={build!r} is not callable")


class _OnWorkers:
    """A multi-worker trainer stage's function: Ray Train trains, the trial saves rank 0's
    model; says what worker group it starts (for ``eeipu_ray.train.max_concurrent_trials``)."""

    def __init__(self, train: Any, finish: Callable[..., Any]) -> None:
        self.train, self.finish = train, finish

    def worker_group(self) -> dict[str, float]:
        return self.train.worker_group()

    def __call__(self, inputs: Any, params: dict[str, Any], ctx: StageContext) -> Any:
        trained = self.train(inputs, params, ctx)  # rank 0's model, on the CPU
        model_dir = ctx.trial_dir / f"{ctx.stage}-model"
        trained["model"].save_pretrained(str(model_dir))
        if trained["processing_class"] is not None:
            trained["processing_class"].save_pretrained(str(model_dir))
        return self.finish(inputs, model_dir, trained["metrics"], ctx)


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How a trainer stage trains: picklable, so that Ray Train workers run it too."""

    build: TrainerBuilder
    args_class: type
    fields: frozenset[str]
    fixed: Mapping[str, Any]
    evaluate: bool

    def train(
        self, inputs: Any, params: dict[str, Any], ctx: StageContext, progress: TrainerCallback
    ) -> tuple[Trainer, dict[str, float]]:
        training_args = _training_args(self.args_class, self.fields, self.fixed, params, ctx)
        trainer = self.build(inputs, training_args, dict(params), ctx)
        if not isinstance(trainer, Trainer):
            raise TypeError(
                f"stage {ctx.stage!r}: build returned {type(trainer).__name__}, "
                "not a transformers.Trainer"
            )
        trainer.add_callback(progress)
        metrics = _floats(trainer.train().metrics)
        if self.evaluate and trainer.eval_dataset is not None:
            metrics.update(_floats(trainer.evaluate()))
        return trainer, metrics


def _train_on_worker(stage: str, recipe: _Recipe, inputs: Any, params: dict[str, Any]) -> Any:
    """One Ray Train worker of a multi-worker trainer stage: the ``Trainer`` finds the
    process group Ray Train set up; rank 0 hands back its model, processor and metrics."""
    import ray.train
    import ray.train.torch

    scratch = Path(tempfile.mkdtemp(prefix=f"eeipu-{stage}-worker-"))
    try:
        device = ray.train.torch.get_device()
        ctx = StageContext(stage=stage, index=0, trial_dir=scratch, device=str(device))
        trainer, metrics = recipe.train(inputs, params, ctx, _WorkerProgress())
        if ray.train.get_context().get_world_rank() != 0:
            return None
        model = trainer.accelerator.unwrap_model(trainer.model).to("cpu")
        return {"model": model, "processing_class": trainer.processing_class, "metrics": metrics}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _WorkerProgress(TrainerCallback):
    """On a Ray Train worker: the trainer's logs go to ``ray.train.report`` (every
    worker logs at the same steps, as Ray Train requires); rank 0's reach the stage."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import ray.train

        ray.train.report({"step": state.global_step, "epoch": state.epoch, **_floats(logs or {})})


class TuneProgress(TrainerCallback):
    """Forwards a ``Trainer``'s logs (loss, learning rate, evaluation metrics)
    to the stage's :meth:`~eeipu_ray.pipeline.StageContext.report`, with the
    global step and epoch: under Ray Tune they become intermediate results."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = _floats(logs or {})
        if values:
            self.ctx.report(**{"step": state.global_step, "epoch": state.epoch, **values})


def _argument_fields(args_class: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(args_class) if f.init)


def _training_args(
    args_class: type,
    fields: frozenset[str],
    fixed: Mapping[str, Any],
    params: Mapping[str, Any],
    ctx: StageContext,
) -> TrainingArguments:
    values = {**_DEFAULT_ARGS, **fixed}
    values.update({key: value for key, value in params.items() if key in fields})
    values["output_dir"] = str(ctx.trial_dir / f"{ctx.stage}-trainer")
    if ctx.device == "cpu":
        values["use_cpu"] = True  # a GPU the trial was not given stays unused
    try:
        return args_class(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"stage {ctx.stage!r}: bad TrainingArguments: {exc}") from exc


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict, as floats."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    }
