"""Criteria: how much each weight matters. Low scores are pruned first.

A criterion is a function ``(weight, grad) -> scores`` with ``scores.shape == weight.shape``.
``grad`` is the calibration gradient statistic computed by :func:`calibration_gradients` (the
mean over calibration batches of ``|dL/dW|``), or ``None`` for criteria that do not need one.
Criteria live in a name → criterion registry so that a trial can choose one by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from autoprune.errors import SpecError
from autoprune.task import Task

ScoreFn = Callable[[Tensor, "Tensor | None"], Tensor]


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A named scoring function; ``needs_grad`` asks for calibration gradients."""

    name: str
    score: ScoreFn
    needs_grad: bool = False


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, *, needs_grad: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator that adds a scoring function to the registry under ``name``."""

    def decorator(fn: ScoreFn) -> ScoreFn:
        if name in CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        CRITERIA[name] = Criterion(name, fn, needs_grad)
        return fn

    return decorator


def get_criterion(name: str) -> Criterion:
    """Return the registered criterion ``name``; raise SpecError naming it if unknown."""
    try:
        return CRITERIA[name]
    except KeyError:
        known = ", ".join(sorted(CRITERIA))
        raise SpecError(f"unknown criterion {name!r} (known: {known})") from None


@register_criterion("magnitude")
def magnitude(weight: Tensor, grad: Tensor | None) -> Tensor:
    """|w|: small weights matter least."""
    return weight.abs()


@register_criterion("random")
def random(weight: Tensor, grad: Tensor | None) -> Tensor:
    """Uniform noise: the baseline any criterion must beat (seeded by the trial)."""
    return torch.rand(weight.shape, dtype=weight.dtype, device=weight.device)


@register_criterion("sensitivity", needs_grad=True)
def sensitivity(weight: Tensor, grad: Tensor | None) -> Tensor:
    """|dL/dW|, the article's S: weights the loss barely reacts to matter least."""
    assert grad is not None
    return grad.clone()


@register_criterion("taylor", needs_grad=True)
def taylor(weight: Tensor, grad: Tensor | None) -> Tensor:
    """|w · dL/dW|: first-order estimate of the loss change when the weight is removed."""
    assert grad is not None
    return (weight * grad).abs()


def calibration_gradients(model: nn.Module, task: Task, layers: list[str]) -> dict[str, Tensor]:
    """Mean over ``task.calibration_batches`` training batches of ``|dL/dW|`` for each layer.

    Gradients are computed here, on a copy's fresh graph, never read from whatever ``.grad``
    the model happens to hold; the model's parameters and ``.grad`` are left untouched.
    """
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in layers]
    totals = [torch.zeros_like(w) for w in weights]
    was_training = model.training
    model.eval()  # no dropout noise in the estimate; batch-norm uses its running statistics
    n = 0
    # A shuffling DataLoader draws its order from the global RNG: fix it, so that the same
    # batches are used whenever this runs (a trial and its replay), and restore it after.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            for inputs, targets in task.batches("train", shuffle=True, seed=0):
                loss = task.loss(model(inputs), targets)
                grads = torch.autograd.grad(loss, weights)
                for total, g in zip(totals, grads, strict=True):
                    total += g.abs()
                n += 1
                if n == task.calibration_batches:
                    break
        finally:
            model.train(was_training)
    return {name: total / max(n, 1) for name, total in zip(layers, totals, strict=True)}
