"""Training and evaluation loops shared by dense training and per-trial fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from autoprune.errors import TrialFailed
from autoprune.task import Task

# Points per epoch on the train-loss curve: enough to see a trend, few enough to store.
_TRAIN_POINTS_PER_EPOCH = 4

# ``on_epoch(epochs done, model, val metric)``, called after each epoch; it may raise to stop.
EpochHook = Callable[[int, nn.Module, float], None]
# ``on_step(steps done, model)``, called before each optimizer step (e.g. to update masks).
StepHook = Callable[[int, nn.Module], None]


def evaluate(model: nn.Module, task: Task, split: str) -> tuple[float, float]:
    """``(metric, mean loss)`` of ``model`` on ``split`` in eval mode, over the whole split."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    try:
        with torch.no_grad():
            for x, y in task.batches(split):
                logits.append(model(x))
                targets.append(y)
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError(f"split {split!r} is empty")
    all_logits, all_targets = torch.cat(logits), torch.cat(targets)
    return float(task.metric(all_logits, all_targets)), float(task.loss(all_logits, all_targets))


def fit(
    model: nn.Module,
    task: Task,
    *,
    epochs: int,
    seed: int,
    on_epoch: EpochHook | None = None,
    on_step: StepHook | None = None,
) -> dict[str, list[list[float]]]:
    """Train ``model`` in place for ``epochs`` epochs with the task's optimizer and loss.

    Batch order is drawn from ``seed``, so a run can be replayed exactly. ``on_epoch`` is
    called after each epoch with the epochs done, the model and its validation metric;
    ``on_step`` before each step's forward pass with the steps done so far and the model.

    Returns:
        Loss curves: ``{"train": [[epoch, loss], ...], "val": [[epoch, loss], ...]}``, where
        ``epoch`` is fractional for train points and ``val`` starts at epoch 0 (before training).

    Raises:
        TrialFailed: If the loss becomes NaN or infinite.
    """
    optimizer = task.optimizer(model.parameters(), task.lr)
    history: dict[str, list[list[float]]] = {"train": [], "val": []}
    if epochs:
        history["val"].append([0.0, evaluate(model, task, "val")[1]])
    done = 0
    for epoch in range(epochs):
        model.train()
        losses = []
        for step, (x, y) in enumerate(task.batches("train", shuffle=True, seed=seed + epoch)):
            if on_step is not None:
                on_step(done, model)
            done += 1
            loss = task.loss(model(x), y)
            value = loss.item()
            if not math.isfinite(value):
                raise TrialFailed(f"non-finite loss {value} at epoch {epoch + 1}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(value)
        history["train"].extend(_curve(losses, epoch))
        metric, val_loss = evaluate(model, task, "val")
        history["val"].append([float(epoch + 1), val_loss])
        if on_epoch is not None:
            on_epoch(epoch + 1, model, metric)
    return history


def _curve(losses: list[float], epoch: int) -> list[list[float]]:
    """Average ``losses`` of one epoch into a few points at fractional epochs."""
    n = len(losses)
    points = min(_TRAIN_POINTS_PER_EPOCH, n)
    curve = []
    for i in range(points):
        chunk = losses[i * n // points : (i + 1) * n // points]
        curve.append([epoch + (i + 1) / points, sum(chunk) / len(chunk)])
    return curve
