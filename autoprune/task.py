"""Task: what the user brings — a trained model, its data, loss, metric and fine-tuning recipe.

A batch may be anything the data yields: an ``(inputs, targets)`` pair, a dict such as a
Hugging Face batch, a bare tensor, or any nesting of them. Three optional hooks say how a batch
meets the model, each with a default that covers the common cases:

- ``forward(model, batch) -> outputs``: by default ``model(**batch)`` for a dict,
  ``model(batch[0])`` for a tuple or list, ``model(batch)`` for a tensor.
- ``batch_loss(outputs, batch) -> scalar``: by default the model's own ``outputs.loss`` when it
  computed one (a Hugging Face model given ``labels``), else ``loss(logits, targets)``.
- the score of a split: by default ``metric(logits, targets)`` per batch, averaged by sample
  count; or ``evaluate(model, batches) -> float`` over the whole split, for metrics that do not
  decompose (F1, perplexity). ``higher_is_better`` says which way the score goes.

``logits`` are ``outputs`` itself, ``outputs.logits``, ``outputs["logits"]`` or ``outputs[0]``;
``targets`` are ``batch[1]`` or ``batch["labels"]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from autoprune import devices
from autoprune.errors import TaskError

Batch = Any
Data = Any  # an (inputs, targets) tensor pair, a DataLoader, or any re-iterable of batches
Metric = Callable[[Tensor, Tensor], float]
Forward = Callable[[nn.Module, Batch], Any]
BatchLoss = Callable[[Any, Batch], Tensor]
SplitMetric = Callable[[nn.Module, Iterable[Batch]], float]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


# The largest learning rate a Task or spec takes: far above any recipe's (LARS at batch 32k
# uses ~30); beyond float32's range the optimizer itself raises mid-trial.
MAX_LR = 1e3


def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose arg-max logit is the target class."""
    return (logits.argmax(dim=-1) == targets).float().mean().item()


def adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The default fine-tuning optimizer (no weight decay, so pruned weights stay put)."""
    return torch.optim.Adam(params, lr=lr)


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """``model(**batch)`` for a dict, ``model(batch[0])`` for a tuple or list, else
    ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's ``outputs``: the tensor itself, ``.logits``, ``["logits"]`` or
    the first element of a tuple.

    Raises:
        TaskError: If none of these is a tensor.
    """
    if isinstance(outputs, Tensor):
        return outputs
    found = getattr(outputs, "logits", None)
    if found is None and isinstance(outputs, Mapping):
        found = outputs.get("logits")
    if found is None and isinstance(outputs, (tuple, list)) and outputs:
        found = outputs[0]
    if not isinstance(found, Tensor):
        raise TaskError(
            f"cannot find logits in model outputs of type {type(outputs).__name__}: give the "
            "Task a batch_loss (and evaluate) hook"
        )
    return found


def targets_of(batch: Batch) -> Tensor | None:
    """The targets in a batch: ``batch[1]`` of a tuple or list, ``batch["labels"]`` of a dict."""
    if isinstance(batch, Mapping):
        found = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        found = batch[1]
    else:
        found = None
    return found if isinstance(found, Tensor) else None


@dataclasses.dataclass(frozen=True)
class Task:
    """A trained model and everything needed to fine-tune and evaluate a pruned copy of it.

    Args:
        model: The trained dense model. It is never modified: every trial prunes a copy.
        train: Fine-tuning data: an ``(inputs, targets)`` tensor pair or a dict of tensors
            with one row per sample (both sliced into batches of ``batch_size``, shuffled by
            the trial's seed), a ``DataLoader``, or any re-iterable of batches.
        val: Validation data; its score is the accuracy objective of the search.
        test: Optional test data; recorded for every trial, never used to select.
        loss: ``loss(logits, targets) -> scalar tensor``, used by the default ``batch_loss``.
        metric: ``metric(logits, targets) -> float`` of one batch; a split's score is its mean
            weighted by batch size. Accuracy by default.
        optimizer: ``optimizer(params, lr)``; Adam by default.
        finetune_epochs: Epochs of fine-tuning per trial (0 evaluates the pruned model as is).
        finetune_steps: A budget of optimizer steps instead of epochs (the data is cycled);
            for datasets too large to go through in a trial.
        lr: Fine-tuning learning rate.
        batch_size: Batch size for tensor data (a DataLoader keeps its own).
        calibration_batches: Training batches used to estimate gradients for the
            gradient-based criteria.
        val_batches: At most this many batches of ``val`` and ``test`` per evaluation.
        grad_accumulation: Batches whose gradients are summed into one optimizer step.
        scheduler: ``scheduler(optimizer, total_steps)`` -> a learning-rate scheduler,
            stepped after every optimizer step.
        forward: ``forward(model, batch) -> outputs`` (see the module doc).
        batch_loss: ``batch_loss(outputs, batch) -> scalar tensor`` (see the module doc).
        evaluate: ``evaluate(model, batches) -> float``: the score of a whole split, for
            metrics that do not decompose into batches; replaces ``metric``.
        higher_is_better: Whether a larger score is better (accuracy, F1) or a smaller one
            (perplexity, error); sets the direction of the accuracy objective.
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; a gradient scaler for fp16), for
            fine-tuning and evaluation.
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
    finetune_steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 32
    calibration_batches: int = 4
    val_batches: int | None = None
    grad_accumulation: int = 1
    scheduler: SchedulerFactory | None = None
    forward: Forward = default_forward
    batch_loss: BatchLoss | None = None
    evaluate: SplitMetric | None = None
    higher_is_better: bool = True
    device: str = "auto"
    precision: str = "fp32"
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
            if isinstance(data, Mapping):
                _check_tensor_dict(field, data)
            elif isinstance(data, (str, bytes, Tensor)) or not (
                _is_tensor_pair(data) or isinstance(data, Iterable)
            ):
                raise TaskError(
                    f"Task.{field} must be an (inputs, targets) tensor pair, a dict of tensors, "
                    f"a DataLoader or an iterable of batches, got {type(data).__name__}"
                )
            if isinstance(data, Iterator):
                raise TaskError(
                    f"Task.{field} is an iterator, which is used up after one pass: give a "
                    "DataLoader or a list of batches"
                )
        for field, low in (
            ("finetune_epochs", 0),
            ("batch_size", 1),
            ("calibration_batches", 1),
            ("grad_accumulation", 1),
        ):
            _check_int(field, getattr(self, field), low)
        for field in ("finetune_steps", "val_batches"):
            if getattr(self, field) is not None:
                _check_int(field, getattr(self, field), 1)
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr <= MAX_LR):
            raise TaskError(f"Task.lr must be a number > 0 and <= {MAX_LR:g}, got {self.lr!r}")
        for field in ("forward", "loss", "metric", "optimizer"):
            if not callable(getattr(self, field)):
                raise TaskError(f"Task.{field} must be callable, got {getattr(self, field)!r}")
        for field in ("batch_loss", "evaluate", "scheduler"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TaskError(f"Task.{field} must be callable or None, got {value!r}")
        if not isinstance(self.higher_is_better, bool):
            raise TaskError(f"Task.higher_is_better must be a bool, got {self.higher_is_better!r}")
        devices.check_device(self.device)
        devices.check_precision(self.precision)

    @property
    def torch_device(self) -> torch.device:
        """The device trials run on (``device`` resolved on this machine).

        Raises:
            TaskError: If that device is not available here.
        """
        return devices.resolve_device(self.device)

    def batches(self, split: str, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``split`` ("train", "val" or "test"), on the CPU as stored.

        Tensor data is sliced directly (much faster than a DataLoader for small models);
        shuffling uses a generator seeded by ``seed`` so that a trial can be replayed. A
        DataLoader keeps its own order (seed its sampler's generator for replays).
        """
        data = getattr(self, split)
        if data is None:
            return
        if not _is_sliced(data):
            yield from data
            return
        n = _rows(data)
        order = None
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for start in range(0, n, self.batch_size):
            if order is None:
                rows: slice | Tensor = slice(start, start + self.batch_size)
            else:
                rows = order[start : start + self.batch_size]
            if isinstance(data, Mapping):
                yield {key: value[rows] for key, value in data.items()}
            else:
                yield data[0][rows], data[1][rows]

    def batches_per_epoch(self) -> int:
        """Training batches in one pass through ``train``.

        Raises:
            TaskError: If ``train`` has no length (an iterable dataset): give ``finetune_steps``.
        """
        if _is_sliced(self.train):
            return math.ceil(_rows(self.train) / self.batch_size)
        try:
            return len(self.train)
        except TypeError:
            raise TaskError(
                f"Task.train ({type(self.train).__name__}) has no length: give finetune_steps"
            ) from None

    def example(self, n: int = 1) -> Batch:
        """The first ``n`` samples of the first validation batch, on the CPU: what structured
        pruning traces and the size objectives measure.

        Raises:
            TaskError: If the validation split is empty.
        """
        batch = next(self.batches("val"), None)
        if batch is None:
            raise TaskError("Task.val is empty")
        return devices.slice_batch(batch, n)

    def outputs(self, model: nn.Module, batch: Batch) -> Any:
        """The model's outputs on ``batch`` (the ``forward`` hook)."""
        return self.forward(model, batch)

    def loss_of(self, outputs: Any, batch: Batch) -> Tensor:
        """The training loss of ``outputs`` on ``batch`` (the ``batch_loss`` hook, or its
        default: the model's own ``outputs.loss``, else ``loss(logits, targets)``).

        Raises:
            TaskError: If the batch has no targets and the model computed no loss.
        """
        if self.batch_loss is not None:
            return self.batch_loss(outputs, batch)
        own = getattr(outputs, "loss", None)
        if own is None and isinstance(outputs, Mapping):
            own = outputs.get("loss")
        if isinstance(own, Tensor):
            return own
        targets = targets_of(batch)
        if targets is None:
            raise TaskError(
                f"a {type(batch).__name__} batch has no targets (batch[1] or batch['labels']) "
                "and the model computed no loss: give the Task a batch_loss hook"
            )
        return self.loss(logits_of(outputs), targets)

    def check(self) -> None:
        """Run the first batch of each split through the model, the loss and the metric (on the
        CPU, in fp32: a quick check that model and data fit, before any device is used).

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
                try:
                    with torch.no_grad():
                        outputs = self.outputs(model, batch)
                        self.loss_of(outputs, batch)
                        if self.evaluate is None:
                            targets = targets_of(batch)
                            if targets is None:
                                raise TaskError(
                                    "the batch has no targets for the metric: give the Task "
                                    "an evaluate hook"
                                )
                            self.metric(logits_of(outputs), targets)
                except Exception as e:  # the model's own error says what does not fit
                    text = str(e).strip()
                    first = text.splitlines()[0] if text else type(e).__name__
                    raise TaskError(
                        f"{split} data {_shape_text(batch)} does not fit the model: {first}"
                    ) from e
        finally:
            model.train(was_training)


def describe(batch: Batch) -> str:
    """A short description of a batch's structure and shapes, for error messages."""
    if isinstance(batch, Tensor):
        return f"shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe(item) for item in batch) + ")"
    return type(batch).__name__


def _shape_text(batch: Batch) -> str:
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return f"of shape {tuple(batch[0].shape)}"
    return f"({describe(batch)})"


def _check_int(field: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TaskError(f"Task.{field} must be an integer >= {low}, got {value!r}")


def _check_tensor_dict(field: str, data: Mapping[Any, Any]) -> None:
    lengths = set()
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, Tensor) or not value.dim():
            raise TaskError(
                f"Task.{field} as a dict must map names to tensors with a row per sample, got "
                f"{key!r}: {type(value).__name__}"
            )
        lengths.add(len(value))
    if len(lengths) != 1:
        raise TaskError(
            f"Task.{field}'s tensors must have the same number of rows, got {sorted(lengths)}"
        )


def _is_sliced(data: Any) -> bool:
    """Whether ``data`` is held as tensors that :meth:`Task.batches` slices itself."""
    return isinstance(data, Mapping) or _is_tensor_pair(data)


def _rows(data: Any) -> int:
    return len(next(iter(data.values()))) if isinstance(data, Mapping) else len(data[0])


def _is_tensor_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and len(data[0]) == len(data[1])
    )


__all__ = [
    "Batch",
    "Task",
    "accuracy",
    "adam",
    "default_forward",
    "describe",
    "logits_of",
    "targets_of",
]
