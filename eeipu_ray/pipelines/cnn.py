"""A real three-stage image classification pipeline: a small CNN in plain PyTorch.

No downloads: the images are scikit-learn's bundled handwritten digits
(``load_digits``: 1797 images of 8x8 pixels, 10 classes), upsampled.

1. ``data``: upsample the digits to ``image_size`` pixels, split them into train
   and validation sets (stratified), and augment the train set with ``copies``
   extra copies of every image, each shifted by up to ``max_shift`` pixels and
   perturbed by Gaussian pixel noise of standard deviation ``noise`` (on the
   [0, 1] intensity scale); then normalize (``minmax``: [0, 1]; ``standard``:
   train mean and deviation; ``per_image``: each image to zero mean, unit
   deviation). The validation images are never augmented.
2. ``train``: a three-layer convolutional network of channel width ``width``,
   trained with AdamW (``lr``, ``weight_decay``) for ``epochs`` epochs on
   ``ctx.device`` (``"cpu"`` or ``"cuda:N"``), reporting the mean training loss
   every epoch (and, with ``build_pipeline(report_score=True)``, the validation
   accuracy as ``score``, which schedulers that stop trials early rank by).
   Returns the weights as a state dict (CPU tensors) together with the
   validation images. This is the expensive stage.
3. ``evaluate``: validation accuracy as ``score``, with optional test-time
   augmentation (``tta="shifts"`` averages the class probabilities over the
   image and its four one-pixel shifts) at softmax temperature
   ``temperature``, which also sets the reported negative log-likelihood
   ``nll``.

Stage outputs are dicts of tensors (stored as safetensors), plus the width as
a plain int. Every random draw is seeded (augmentation, weight init, batch
order), so on the CPU a config always gives the same score; on a GPU, cuDNN may
pick nondeterministic kernels unless ``torch.use_deterministic_algorithms`` is on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# The first optimizer a process builds imports torch._dynamo (~2 s on one core).
# Import it with this module, so that it is not charged to the first trial's
# ``train`` stage as compute cost.
import torch._dynamo
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from eeipu_ray.pipeline import Pipeline, Stage, StageContext

N_CLASSES = 10
# load_digits pixels are integers 0..16.
_MAX_INTENSITY = 16.0


class ConvNet(nn.Module):
    """conv-relu, conv-relu, max-pool, conv-relu, 2x2 average pool, linear.

    The final adaptive pool makes it work for any image size >= 2.

    Args:
        width: Channels of the first two convolutions (the third has ``2 * width``).
        n_classes: Number of output logits.
    """

    def __init__(self, width: int, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(8 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``n x n_classes`` for images of shape ``n x 1 x h x w``."""
        return self.head(self.features(x).flatten(1))


def _data(_: None, p: dict[str, Any]) -> dict[str, torch.Tensor]:
    digits = load_digits()
    images = digits.images.astype(np.float32) / _MAX_INTENSITY  # n x 8 x 8 in [0, 1]
    labels = digits.target.astype(np.int64)
    if p["n_samples"] is not None and p["n_samples"] < len(labels):
        images, _, labels, _ = train_test_split(
            images, labels, train_size=p["n_samples"], stratify=labels, random_state=p["seed"]
        )
    size = p["image_size"]
    images = F.interpolate(
        torch.from_numpy(images)[:, None], size=(size, size), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    x_train, x_val, y_train, y_val = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=p["seed"]
    )

    rng = np.random.default_rng(p["seed"])
    augmented = [x_train]
    for _copy in range(p["copies"]):
        shifts = rng.integers(-p["max_shift"], p["max_shift"] + 1, size=(len(x_train), 2))
        copy = np.stack(
            [_shift(img, dy, dx) for img, (dy, dx) in zip(x_train, shifts, strict=True)]
        )
        copy += rng.normal(scale=p["noise"], size=copy.shape).astype(np.float32)
        augmented.append(copy)
    x_train = np.concatenate(augmented)
    y_train = np.tile(y_train, p["copies"] + 1)

    if p["normalize"] == "minmax":
        pass  # already on [0, 1]
    elif p["normalize"] == "standard":
        mean, std = x_train.mean(), x_train.std() + 1e-6
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    elif p["normalize"] == "per_image":
        x_train, x_val = _standardize_each(x_train), _standardize_each(x_val)
    else:
        raise ValueError(
            f"normalize must be 'minmax', 'standard' or 'per_image', got {p['normalize']!r}"
        )
    return {
        "x_train": torch.from_numpy(np.ascontiguousarray(x_train[:, None], dtype=np.float32)),
        "y_train": torch.from_numpy(y_train),
        "x_val": torch.from_numpy(np.ascontiguousarray(x_val[:, None], dtype=np.float32)),
        "y_val": torch.from_numpy(y_val),
    }


def _train(
    data: dict[str, torch.Tensor],
    p: dict[str, Any],
    ctx: StageContext,
    *,
    report_score: bool = False,
) -> dict[str, Any]:
    device = torch.device(ctx.device)
    model = _new_model(p["width"], p["seed"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    x_train, y_train = data["x_train"].to(device), data["y_train"].to(device)
    order_rng = torch.Generator().manual_seed(p["seed"])
    batch = p["batch_size"]
    model.train()
    for epoch in range(1, p["epochs"] + 1):
        order = torch.randperm(len(y_train), generator=order_rng).to(device)
        total_loss = torch.zeros((), device=device)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(idx)
        progress = {"epoch": epoch, "loss": float(total_loss) / len(y_train)}
        if report_score:
            # Plain validation accuracy (no test-time augmentation); no random
            # draws, so the training that follows is unchanged.
            progress["score"] = _accuracy(model, data["x_val"], data["y_val"], device)
        ctx.report(**progress)
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "width": int(p["width"]),
        "x_val": data["x_val"],
        "y_val": data["y_val"],
    }


def _evaluate(trained: dict[str, Any], p: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    if p["tta"] not in ("none", "shifts"):
        raise ValueError(f"tta must be 'none' or 'shifts', got {p['tta']!r}")
    device = torch.device(ctx.device)
    model = _new_model(trained["width"], seed=0)
    model.load_state_dict(trained["state_dict"])
    model.to(device).eval()
    x_val, y_val = trained["x_val"].to(device), trained["y_val"].to(device)
    views = [(0, 0)] + ([(1, 0), (-1, 0), (0, 1), (0, -1)] if p["tta"] == "shifts" else [])
    with torch.no_grad():
        proba = torch.stack(
            [
                torch.softmax(model(_shift_batch(x_val, dy, dx)) / p["temperature"], dim=1)
                for dy, dx in views
            ]
        ).mean(dim=0)
    accuracy = (proba.argmax(dim=1) == y_val).double().mean()
    nll = -proba.gather(1, y_val[:, None]).clamp_min(1e-12).log().mean()
    return {"score": float(accuracy), "nll": float(nll)}


def _accuracy(model: ConvNet, x_val: torch.Tensor, y_val: torch.Tensor, device: Any) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x_val.to(device)).argmax(dim=1) == y_val.to(device)).double().mean()
    model.train()
    return float(correct)


def training_memory_bytes(config: Mapping[str, Any], pipeline: Pipeline | None = None) -> int:
    """An estimate of the device memory the ``train`` stage of ``config`` needs, in bytes.

    float32 throughout: the training set (moved to the device whole), the
    weights with their gradients and AdamW's two moments (4 copies), and per
    image of a batch the activations kept for the backward pass plus their
    gradients (2 copies). Allocator and CUDA-context overheads are not
    included: leave headroom (``fits_device_memory(headroom=0.9)``). Meant for
    ``SM2Scheduler(fits=...)``, so that a batch size that cannot fit never starts.

    Args:
        config: Nested ``{stage: {key: value}}`` or flat ``"stage/key"`` (the
            data stage's ``image_size``, ``copies``, ``n_samples``; the train
            stage's ``width``, ``batch_size``).
        pipeline: The CNN pipeline the config is for: its constants
            (``image_size``, ``n_samples``, ...) fill what the config leaves
            out. Without it, missing keys take ``build_pipeline``'s defaults.

    Example:
        >>> fits = fits_device_memory(functools.partial(training_memory_bytes,
        ...                                             pipeline=pipeline), 16 * 2**30)
    """
    if pipeline is not None:
        config = dict(zip(pipeline.stage_names, pipeline.split_config(config), strict=True))

    def get(stage: str, key: str, default: Any = None) -> Any:
        if f"{stage}/{key}" in config:
            return config[f"{stage}/{key}"]
        return dict(config.get(stage) or {}).get(key, default)

    size = int(get("data", "image_size", 16))
    copies = int(get("data", "copies", 0))
    n = get("data", "n_samples") or 1797
    width, batch = int(get("train", "width")), int(get("train", "batch_size"))
    n_train = (int(n) - math.ceil(0.25 * int(n))) * (copies + 1)
    dataset = n_train * (size * size * 4 + 8)  # images + int64 labels
    half = size // 2
    params = (
        (9 * width + width)
        + (9 * width * width + width)
        + (9 * width * 2 * width + 2 * width)
        + (8 * width * N_CLASSES + N_CLASSES)
    )
    activations = (
        size * size  # input
        + 4 * width * size * size  # conv1, relu, conv2, relu
        + width * half * half  # max pool
        + 4 * width * half * half  # conv3, relu
        + 2 * 8 * width  # average pool, flatten
        + N_CLASSES
    )
    return int(dataset + 4 * 4 * params + 2 * 4 * activations * min(batch, n_train))


def _new_model(width: int, seed: int) -> ConvNet:
    """A freshly initialized :class:`ConvNet`, seeded without touching the global RNG
    (a stage must not change what the code around it draws next)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvNet(width)


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` moved ``dy`` rows down and ``dx`` columns right, zero-filled."""
    h, w = image.shape
    out = np.zeros_like(image)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _shift_batch(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images ``n x 1 x h x w`` moved by ``(dy, dx)``, the border replicated.

    Replicating (not zero-filling) keeps the background right whatever the
    normalization made of it."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))  # left, right, top, bottom
    padded = F.pad(x, pad, mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def _standardize_each(images: np.ndarray) -> np.ndarray:
    mean = images.mean(axis=(1, 2), keepdims=True)
    std = images.std(axis=(1, 2), keepdims=True) + 1e-6
    return (images - mean) / std


def build_pipeline(
    n_samples: int | None = None,
    image_size: int = 16,
    max_epochs: int = 12,
    report_score: bool = False,
) -> Pipeline:
    """The CNN pipeline.

    Args:
        n_samples: Digits used (a stratified subset); ``None`` uses all 1797.
            A quarter of them is the validation split.
        image_size: Side length the 8x8 digits are upsampled to.
        max_epochs: Upper end of the ``epochs`` range (which starts at a quarter of it).
        report_score: Report the validation accuracy as ``score`` after every
            epoch of ``train`` (an intermediate Tune result per epoch), for
            schedulers that stop trials early (ASHA, ``SM2Scheduler``). It
            costs one forward pass over the validation set per epoch and does
            not change what is trained or cached. The final ``score`` is the
            ``evaluate`` stage's (with its test-time augmentation).

    At the defaults a trial takes from under a second to about 20 s on one CPU
    core (a few seconds typically), mostly in ``train``: its cost grows with
    ``copies + 1``, ``epochs`` and ``width`` squared. Tests pass small values.
    """
    from ray import tune

    if image_size < 2:
        raise ValueError(f"image_size must be >= 2, got {image_size}")
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if n_samples is not None and n_samples < 4 * N_CLASSES:
        raise ValueError(f"n_samples must be None or >= {4 * N_CLASSES}, got {n_samples}")
    return Pipeline(
        "cnn",
        [
            Stage(
                "data",
                _data,
                {
                    "copies": tune.choice([0, 1, 2]),
                    "max_shift": tune.randint(0, max(1, image_size // 8) + 1),
                    "noise": tune.uniform(0.0, 0.3),
                    "normalize": tune.choice(["minmax", "standard", "per_image"]),
                    "n_samples": n_samples,
                    "image_size": image_size,
                    "seed": 0,
                },
            ),
            Stage(
                "train",
                functools.partial(_train, report_score=True) if report_score else _train,
                {
                    "lr": tune.loguniform(1e-3, 3e-2),
                    "weight_decay": tune.loguniform(1e-5, 1e-1),
                    "epochs": tune.randint(max(1, max_epochs // 4), max_epochs + 1),
                    "width": tune.choice([8, 16, 24]),
                    "batch_size": 64,
                    "seed": 0,
                },
            ),
            Stage(
                "evaluate",
                _evaluate,
                {
                    "tta": tune.choice(["none", "shifts"]),
                    "temperature": tune.loguniform(0.5, 2.0),
                },
            ),
        ],
    )
