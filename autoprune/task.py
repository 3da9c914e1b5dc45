"""Task: what the user brings — a trained model, its data, loss, metric and fine-tuning recipe."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from autoprune.errors import TaskError

Batch = tuple[Tensor, Tensor]
Data = tuple[Tensor, Tensor] | DataLoader
Metric = Callable[[Tensor, Tensor], float]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose arg-max logit is the target class."""
    return (logits.argmax(dim=1) == targets).float().mean().item()


def adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The default fine-tuning optimizer (no weight decay, so pruned weights stay put)."""
    return torch.optim.Adam(params, lr=lr)


@dataclasses.dataclass(frozen=True)
class Task:
    """A trained model and everything needed to fine-tune and evaluate a pruned copy of it.

    Args:
        model: The trained dense model. It is never modified: every trial prunes a copy.
        train: Fine-tuning data, as ``(inputs, targets)`` tensors or a ``DataLoader``.
        val: Validation data; its metric is the accuracy objective of the search.
        test: Optional test data; recorded for every trial, never used to select.
        loss: ``loss(logits, targets) -> scalar tensor``.
        metric: ``metric(logits, targets) -> float`` over a whole split; accuracy by default.
        optimizer: ``optimizer(params, lr)``; Adam by default.
        finetune_epochs: Epochs of fine-tuning per trial (0 evaluates the pruned model as is).
        lr: Fine-tuning learning rate.
        batch_size: Batch size for tensor data (a DataLoader keeps its own).
        calibration_batches: Training batches used to estimate gradients for the
            gradient-based criteria.
        name: A label stored with the study.
    """

    model: nn.Module
    train: Data
    val: Data
    test: Data | None = None
    loss: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy
    metric: Metric = accuracy
    optimizer: OptimizerFactory = adam
    finetune_epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 32
    calibration_batches: int = 4
    name: str = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TaskError(
                f"Task.model must be a torch.nn.Module, got {type(self.model).__name__}"
            )
        for field in ("train", "val", "test"):
            data = getattr(self, field)
            if data is None and field == "test":
                continue
            if not isinstance(data, DataLoader) and not _is_tensor_pair(data):
                raise TaskError(
                    f"Task.{field} must be an (inputs, targets) tensor pair or a DataLoader, "
                    f"got {type(data).__name__}"
                )
        for field, low in (("finetune_epochs", 0), ("batch_size", 1), ("calibration_batches", 1)):
            value = getattr(self, field)
            if not isinstance(value, int) or value < low:
                raise TaskError(f"Task.{field} must be an integer >= {low}, got {value!r}")
        if not self.lr > 0:
            raise TaskError(f"Task.lr must be > 0, got {self.lr!r}")

    def batches(self, split: str, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Yield ``(inputs, targets)`` batches of ``split`` ("train", "val" or "test").

        Tensor data is sliced directly (much faster than a DataLoader for small models);
        shuffling uses a generator seeded by ``seed`` so that a trial can be replayed.
        """
        data = getattr(self, split)
        if data is None:
            return
        if isinstance(data, DataLoader):
            yield from data
            return
        inputs, targets = data
        n = len(inputs)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield (
                    inputs[start : start + self.batch_size],
                    targets[start : start + self.batch_size],
                )
            else:
                index = order[start : start + self.batch_size]
                yield inputs[index], targets[index]

    def check(self) -> None:
        """Run the first batch of each split through the model and the loss and metric.

        Raises:
            TaskError: Naming the split and its shape, if a split is empty or does not fit.
        """
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for split in ("train", "val", "test"):
                if split == "test" and self.test is None:
                    continue
                batch = next(self.batches(split), None)
                if batch is None:
                    raise TaskError(f"Task.{split} is empty")
                inputs, targets = batch
                try:
                    with torch.no_grad():
                        logits = model(inputs)
                        self.loss(logits, targets)
                        self.metric(logits, targets)
                except Exception as e:  # the model's own error says what does not fit
                    text = str(e).strip()
                    first = text.splitlines()[0] if text else type(e).__name__
                    raise TaskError(
                        f"{split} data of shape {tuple(inputs.shape)} does not fit the model: "
                        f"{first}"
                    ) from e
        finally:
            model.train(was_training)


def _is_tensor_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and len(data[0]) == len(data[1])
    )
