"""Recovery settings of a fine-tune: its learning rate, a rewound schedule, distillation.

A pruned model recovers by fine-tuning with the task's recipe (:func:`autoprune.train.fit`).
A policy may change three things about it, always at the same step budget:

- ``lr_scale``: the fine-tune learning rate is ``task.lr * lr_scale``.
- ``rewind``: learning-rate rewinding (Renda et al. 2020, "Comparing rewinding and fine-tuning
  in neural network pruning"): instead of the task's scheduler (or its constant rate), replay
  a high-then-decaying schedule over the same steps. Concretely, with ``S`` steps,
  ``W = max(1, round(REWIND_WARMUP * S))`` and peak ``P = REWIND_PEAK``, the learning rate of
  step ``s`` (0-based) is ``lr * f(s)`` where ``f(s) = P * (s + 1) / W`` for ``s < W`` (a
  linear warm-up to the peak at step ``W - 1``) and
  ``f(s) = P * (1 + cos(pi * (s + 1 - W) / (S + 1 - W))) / 2`` after it (a cosine decay
  towards 0 over the remaining steps).
- ``distill``: knowledge distillation (Hinton et al. 2015) from the dense model. The loss of a
  batch is ``(1 - d) * task_loss + d * T^2 * KL(softmax(t / T) || softmax(s / T))`` where
  ``s`` and ``t`` are the student's and the teacher's logits (:func:`autoprune.task.logits_of`,
  every row of the last dimension a distribution, the KL averaged over rows), ``T`` is
  ``DISTILL_TEMPERATURE`` and ``task_loss`` is the task's own (its ``batch_loss`` hook). The
  teacher runs in eval mode without gradients, once per batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from autoprune.errors import SpecError
from autoprune.task import Batch, Task, logits_of

# Softening of the soft targets. One constant rather than a searched field: every searched
# dimension costs trials a small budget does not have. 1, not the customary 2-4: on the digits
# tasks at 95-98% sparsity with a 2-epoch fine-tune, distilling at T=2 or T=4 lost 1-15
# points of test accuracy against the task's loss alone, at T=1 it was level (within about a
# point; scripts/bench_recovery.py --temperature T).
DISTILL_TEMPERATURE = 1.0
# Rewinding: the peak learning rate as a multiple of the fine-tune rate, and the fraction of
# the steps spent warming up to it. A fine-tune rate is usually the end of a training run's
# schedule; rewinding goes back up to about the rate of training itself.
REWIND_PEAK = 3.0
REWIND_WARMUP = 0.1


@dataclasses.dataclass(frozen=True)
class Recovery:
    """How a fine-tune departs from the task's recipe (the defaults: not at all).

    Args:
        lr_scale: The learning rate is ``task.lr * lr_scale``.
        rewind: Replace the task's scheduler by the rewound one (see the module doc).
        distill: Weight ``d`` in [0, 1) of the distillation term; 0 turns it off.
        teacher: The dense model, on the fine-tune's device; needed when ``distill > 0``.

    Raises:
        SpecError: If ``distill > 0`` and there is no teacher.
    """

    lr_scale: float = 1.0
    rewind: bool = False
    distill: float = 0.0
    teacher: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.distill and self.teacher is None:
            raise SpecError(f"distill {self.distill!r} needs a teacher model")

    def scheduler(self, task: Task, optimizer: torch.optim.Optimizer, steps: int) -> Any:
        """The learning-rate scheduler of a fine-tune of ``steps`` optimizer steps."""
        if self.rewind:
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: rewind_factor(step, steps)
            )
        return task.scheduler(optimizer, steps) if task.scheduler is not None else None

    def loss(self, task_loss: Tensor, outputs: Any, teacher_logits: Tensor | None) -> Tensor:
        """The loss to minimise: the task's, mixed with distillation when it is on."""
        if teacher_logits is None:
            return task_loss
        kd = distill_loss(logits_of(outputs), teacher_logits)
        return (1.0 - self.distill) * task_loss + self.distill * kd


def rewind_factor(step: int, steps: int) -> float:
    """The rewound schedule's learning rate at ``step`` (0-based) of ``steps``, as a multiple
    of the fine-tune rate (see the module doc)."""
    warmup = max(1, round(REWIND_WARMUP * steps))
    if step < warmup:
        return REWIND_PEAK * (step + 1) / warmup
    progress = min(1.0, (step + 1 - warmup) / (steps + 1 - warmup))
    return REWIND_PEAK * 0.5 * (1.0 + math.cos(math.pi * progress))


def distill_loss(student: Tensor, teacher: Tensor, temperature: float | None = None) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over rows (every
    index of the leading dimensions), computed in fp32; ``T`` is ``DISTILL_TEMPERATURE``
    unless given."""
    if temperature is None:
        temperature = DISTILL_TEMPERATURE
    classes = student.shape[-1]
    log_student = torch.log_softmax(student.float().reshape(-1, classes) / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher.float().reshape(-1, classes) / temperature, dim=-1)
    kl = nn.functional.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def teacher_logits(teacher: nn.Module, task: Task, batch: Batch) -> Tensor:
    """The teacher's logits on ``batch``, without gradients (detached)."""
    with torch.no_grad():
        return logits_of(task.outputs(teacher, batch)).detach()


@contextmanager
def eval_mode(module: nn.Module | None) -> Iterator[None]:
    """``module`` in eval mode for the block, its own mode restored after."""
    if module is None:
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
