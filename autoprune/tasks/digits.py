"""Built-in tasks on scikit-learn's bundled 8×8 digits (no download)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from autoprune.task import Task
from autoprune.tasks._cache import cached_model
from autoprune.tasks.resnet import ResNet
from autoprune.train import fit

# The split is part of the benchmark, so it is fixed; the task seed only changes the model.
_SPLIT_SEED = 0
# Dense training recipe; a change here changes the cache key and retrains.
# Weight decay only here, in dense training: it lifts the MLP's test accuracy above 0.97.
_EPOCHS, _LR, _BATCH_SIZE, _WEIGHT_DECAY = 40, 3e-3, 32, 1e-2
# BatchNorm makes the ResNet converge in fewer epochs; its 10 take about 20 s on one thread.
_RESNET_EPOCHS = 10


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified 60/20/20 train/val/test split of the 1,797 digits; pixels scaled to [0, 1]."""
    # Imported here: scikit-learn takes about a second to import, and every start of the CLI
    # and of each worker process would pay it, most of them for tasks other than digits.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.data.astype(np.float32) / 16.0, data.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=_SPLIT_SEED
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=_SPLIT_SEED
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions and two linear layers (about 38k weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def digits_mlp_model() -> nn.Module:
    """A 64-128-64-10 perceptron (about 17k weights)."""
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def digits_cnn(*, seed: int = 0) -> Task:
    """The digits CNN task, its dense model trained once per seed and cached."""
    return _digits_task("digits-cnn", DigitsCNN, (1, 8, 8), seed)


def digits_mlp(*, seed: int = 0) -> Task:
    """The digits MLP task, its dense model trained once per seed and cached."""
    return _digits_task("digits-mlp", digits_mlp_model, (64,), seed)


def digits_resnet_model() -> nn.Module:
    """A ResNet with a 64-channel stem and two stages of two basic blocks (64 and 128 channels,
    as ResNet-18's first two stages), all at the digits' 8×8 resolution, with BatchNorm and a
    linear classifier (about 680k weights, 43M multiply-adds per image).

    Its size is what makes structured pruning measurable: CPU convolution kernels run near
    their peak multiply-add rate only with about 32 channels or more and enough pixels per
    call, so a network that is to be pruned 4x must start wide, and must not shrink its
    feature maps to 4×4, for its pruned layers to stay efficient
    (``scripts/bench_structured.py`` prints the rate by width)."""
    return ResNet(widths=(64, 128), blocks_per_stage=2, classes=10, downsample=False)


def digits_resnet(*, seed: int = 0) -> Task:
    """The digits ResNet task (residual blocks, BatchNorm), trained once per seed and cached."""
    return _digits_task(
        "digits-resnet", digits_resnet_model, (1, 8, 8), seed, epochs=_RESNET_EPOCHS
    )


def _adamw(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=_WEIGHT_DECAY)


def _digits_task(
    name: str,
    build: type[nn.Module] | object,
    shape: tuple[int, ...],
    seed: int,
    *,
    epochs: int = _EPOCHS,
) -> Task:
    split = {
        key: (torch.from_numpy(x).reshape(-1, *shape), torch.from_numpy(y))
        for key, (x, y) in digits_split().items()
    }
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        model = build()  # type: ignore[operator]
    task = Task(model=model, train=split["train"], val=split["val"], test=split["test"], name=name)

    def train(m: nn.Module) -> None:
        # On one thread: sums then add up in one order, so the same seed gives the same
        # weights bit for bit whatever the thread count (and the study's fingerprint holds).
        recipe = dataclasses.replace(task, lr=_LR, batch_size=_BATCH_SIZE, optimizer=_adamw)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                fit(m, recipe, epochs=epochs, seed=seed)
        finally:
            torch.set_num_threads(threads)

    key = {
        "task": name,
        "seed": seed,
        "split_seed": _SPLIT_SEED,
        "arch": repr(model),
        "recipe": [epochs, _LR, _BATCH_SIZE, _WEIGHT_DECAY],
        "threads": 1,  # entries trained on more threads differ in their last bits
    }
    cached_model(model, key, train)
    model.eval()
    return task
