"""Training and evaluation loops shared by dense training and per-trial fine-tuning.

Both run on the device the model's parameters are on, in the task's precision; batches are
moved there as they come (see :mod:`autoprune.devices`), and the task's hooks say how a batch
meets the model (see :mod:`autoprune.task`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from autoprune import devices
from autoprune.errors import TaskError, TrialFailed
from autoprune.recovery import Recovery, eval_mode, teacher_logits
from autoprune.task import Batch, Task, logits_of, targets_of

# Points per epoch on the train-loss curve: enough to see a trend, few enough to store.
_TRAIN_POINTS_PER_EPOCH = 4
# Batches between checks for a non-finite loss: each check waits for the device, so not every
# batch (a GPU runs ahead of Python in between), yet a diverged trial stops soon.
_CHECK_EVERY = 16

# ``on_epoch(epochs done, model, val metric)``, called after each epoch; it may raise to stop.
EpochHook = Callable[[int, nn.Module, float], None]
# ``on_step(steps done, model)``, called before each optimizer step (e.g. to update masks).
StepHook = Callable[[int, nn.Module], None]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for a model with none)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def split_batches(task: Task, split: str, device: torch.device) -> Iterator[Batch]:
    """The batches of an evaluation split on ``device``, at most ``task.val_batches`` of them."""
    batches = task.batches(split)
    if task.val_batches is not None:
        batches = itertools.islice(batches, task.val_batches)
    for batch in batches:
        yield devices.to_device(batch, device)


def evaluate(model: nn.Module, task: Task, split: str) -> tuple[float, float]:
    """``(score, mean loss)`` of ``model`` on ``split`` in eval mode.

    The score is the task's ``evaluate`` hook over the whole split, or its per-batch ``metric``
    averaged by batch size; the loss is averaged by batch size too (NaN when a split's batches
    carry no targets and the model computes no loss, which a whole-split ``evaluate`` allows).

    Raises:
        ValueError: If the split is empty.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), devices.autocast(device, task.precision):
            if task.evaluate is not None:
                score = float(task.evaluate(model, split_batches(task, split, device)))
                return score, _mean_loss(model, task, split, device)
            score_sum, loss_sum, n = 0.0, 0.0, 0
            for batch in split_batches(task, split, device):
                outputs = task.outputs(model, batch)
                targets = targets_of(batch)
                if targets is None:
                    raise TaskError(
                        f"{split} batches have no targets for the metric: give the Task an "
                        "evaluate hook"
                    )
                size = devices.batch_size(batch)
                score_sum += float(task.metric(logits_of(outputs).float(), targets)) * size
                loss_sum += float(task.loss_of(outputs, batch)) * size
                n += size
    finally:
        model.train(was_training)
    if not n:
        raise ValueError(f"split {split!r} is empty")
    return score_sum / n, loss_sum / n


def _mean_loss(model: nn.Module, task: Task, split: str, device: torch.device) -> float:
    total, n = 0.0, 0
    for batch in split_batches(task, split, device):
        try:
            loss = task.loss_of(task.outputs(model, batch), batch)
        except TaskError:  # no targets and no loss of its own: the score is all there is
            return math.nan
        size = devices.batch_size(batch)
        total += float(loss) * size
        n += size
    if not n:
        raise ValueError(f"split {split!r} is empty")
    return total / n


def total_steps(task: Task, epochs: int | None = None) -> int:
    """Optimizer steps of a fine-tune: ``task.finetune_steps``, else ``epochs`` (default the
    task's) passes of ``ceil(batches / grad_accumulation)`` steps each."""
    if epochs is None and task.finetune_steps is not None:
        return task.finetune_steps
    epochs = task.finetune_epochs if epochs is None else epochs
    if not epochs:
        return 0
    return epochs * steps_per_epoch(task)


def steps_per_epoch(task: Task) -> int:
    """Optimizer steps in one pass through the training data."""
    return math.ceil(task.batches_per_epoch() / task.grad_accumulation)


def fit(
    model: nn.Module,
    task: Task,
    *,
    epochs: int | None = None,
    seed: int,
    on_epoch: EpochHook | None = None,
    on_step: StepHook | None = None,
    recovery: Recovery | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, list[list[float]]]:
    """Train ``model`` in place with the task's optimizer, loss, scheduler and precision.

    The budget is ``epochs`` passes through the training data, or by default the task's own:
    ``finetune_steps`` optimizer steps when set (the data cycled as often as needed), else
    ``finetune_epochs`` passes. Batch order is drawn from ``seed``, so a run can be replayed
    exactly. After each pass, and at the end of a step budget, the model is evaluated on the
    validation split and ``on_epoch`` is called with the passes done, the model and its score;
    ``on_step`` is called before each optimizer step's first forward pass with the steps done.

    ``recovery`` may scale the learning rate, rewind its schedule and distill from a teacher,
    at the same budget (see :mod:`autoprune.recovery`); the teacher's time is added to
    ``timings["teacher"]`` (wall time of its calls: on a GPU, the time to queue its work).

    Returns:
        Loss curves: ``{"train": [[epoch, loss], ...], "val": [[epoch, loss], ...]}``, where
        ``epoch`` is fractional (optimizer steps / steps per pass) and ``val`` starts at 0.
        The train curve is the task's loss, with or without distillation.

    Raises:
        TrialFailed: If the loss becomes NaN or infinite.
        TaskError: If the training data is empty.
    """
    steps = total_steps(task, epochs)
    history: dict[str, list[list[float]]] = {"train": [], "val": []}
    if not steps:
        return history
    device = model_device(model)
    per_pass = _steps_per_pass(task)
    recovery = recovery if recovery is not None else Recovery()
    teacher = recovery.teacher if recovery.distill else None
    optimizer = task.optimizer(model.parameters(), task.lr * recovery.lr_scale)
    scheduler = recovery.scheduler(task, optimizer, steps)
    scaler = devices.grad_scaler(device, task.precision)
    history["val"].append([0.0, evaluate(model, task, "val")[1]])
    done, passes = 0, 0
    with eval_mode(teacher):  # the teacher's dropout and batch statistics held
        while done < steps:
            model.train()
            losses: list[torch.Tensor] = []
            micro, start = 0, done
            for batch in task.batches("train", shuffle=True, seed=seed + passes):
                if micro == 0 and on_step is not None:
                    on_step(done, model)
                batch = devices.to_device(batch, device)
                with devices.autocast(device, task.precision):
                    soft = _teacher(teacher, task, batch, timings)
                    outputs = task.outputs(model, batch)
                    loss = task.loss_of(outputs, batch)
                    objective = recovery.loss(loss, outputs, soft)
                scaler.scale(objective / task.grad_accumulation).backward()
                losses.append(loss.detach().float())
                if len(losses) % _CHECK_EVERY == 0:
                    _check_finite(losses, len(losses) - _CHECK_EVERY, passes)
                micro += 1
                if micro == task.grad_accumulation:
                    _step(optimizer, scheduler, scaler)
                    micro, done = 0, done + 1
                    if done == steps:
                        break
            if not losses:
                raise TaskError("Task.train yielded no batch")
            values = _check_finite(losses, 0, passes)
            if micro:  # the pass ended inside an accumulation: its gradients still count
                _step(optimizer, scheduler, scaler)
                done += 1
            passes += 1
            curve = _curve(values, start / per_pass, (done - start) / per_pass)
            history["train"].extend(curve)
            score, val_loss = evaluate(model, task, "val")
            history["val"].append([done / per_pass, val_loss])
            if on_epoch is not None:
                on_epoch(passes, model, score)
    return history


def _teacher(
    teacher: nn.Module | None, task: Task, batch: Batch, timings: dict[str, float] | None
) -> torch.Tensor | None:
    """The teacher's logits on ``batch`` (None without a teacher), its time in ``timings``."""
    if teacher is None:
        return None
    start = time.perf_counter()
    logits = teacher_logits(teacher, task, batch)
    if timings is not None:
        timings["teacher"] = timings.get("teacher", 0.0) + time.perf_counter() - start
    return logits


def _check_finite(losses: list[torch.Tensor], first: int, passes: int) -> list[float]:
    """The pass's losses from batch ``first`` on, as floats (one device sync), or TrialFailed
    at the first that is NaN or infinite."""
    values = torch.stack(losses[first:]).tolist()
    for i, value in enumerate(values, start=first):
        if not math.isfinite(value):
            raise TrialFailed(f"non-finite loss {value} at epoch {passes + 1}, batch {i}")
    return values


def _steps_per_pass(task: Task) -> float:
    """Steps per pass for the x axis of the loss curves (1 for data of unknown length: the
    axis is then in steps)."""
    try:
        return float(steps_per_epoch(task))
    except TaskError:
        return 1.0


def _step(
    optimizer: torch.optim.Optimizer, scheduler: object, scaler: torch.amp.GradScaler
) -> None:
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()  # type: ignore[attr-defined]


def _curve(losses: list[float], start: float, length: float) -> list[list[float]]:
    """Average ``losses`` of one pass, which spans ``[start, start + length]`` on the epoch
    axis, into a few points."""
    n = len(losses)
    points = min(_TRAIN_POINTS_PER_EPOCH, n)
    curve = []
    for i in range(points):
        chunk = losses[i * n // points : (i + 1) * n // points]
        curve.append([start + length * (i + 1) / points, sum(chunk) / len(chunk)])
    return curve
