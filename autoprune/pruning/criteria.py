"""Criteria: how much each weight, or each output channel, matters. Low scores are pruned first.

A criterion scores with a function ``(weight, grad) -> scores``: for unstructured pruning one
score per weight (``scores.shape == weight.shape``), for structured pruning one score per output
channel (``scores.shape == (weight.shape[0],)``). ``grad`` is the calibration gradient statistic
computed by :func:`calibration_gradients` (the mean over calibration batches of ``|dL/dW|``), or
``None`` for criteria that do not need one. Criteria live in one name → criterion registry so
that a trial can choose one by name; a criterion may score either granularity, or both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from autoprune._registry import Registry
from autoprune.devices import to_device
from autoprune.errors import SpecError
from autoprune.task import Task

ScoreFn = Callable[[Tensor, "Tensor | None"], Tensor]


GRANULARITIES = ("unstructured", "structured")
# What a channel criterion scores: the weight of a Linear/Conv layer, or a BatchNorm's scale.
CHANNEL_SOURCES = ("layer", "batchnorm")


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A named criterion; ``needs_grad`` asks for calibration gradients.

    Args:
        score: Scores every weight (unstructured pruning), or None.
        channel_score: Scores every output channel (structured pruning), or None.
        channel_source: ``"layer"``: ``channel_score`` gets a Linear/Conv weight (output
            channels first); ``"batchnorm"``: it gets the scale (gamma) of a BatchNorm.
    """

    name: str
    score: ScoreFn | None
    needs_grad: bool = False
    channel_score: ScoreFn | None = None
    channel_source: str = "layer"

    @property
    def granularities(self) -> tuple[str, ...]:
        """The granularities this criterion can score."""
        fns = {"unstructured": self.score, "structured": self.channel_score}
        return tuple(g for g in GRANULARITIES if fns[g] is not None)


CRITERIA: Registry[Criterion] = Registry("criterion")


def register_criterion(
    name: str,
    *,
    needs_grad: bool = False,
    granularity: str = "unstructured",
    channel_source: str = "layer",
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator that adds a scoring function to the registry under ``name``.

    A name may be registered once per granularity (e.g. ``taylor`` scores weights and
    channels); both registrations must agree on ``needs_grad``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}")
    if channel_source not in CHANNEL_SOURCES:
        raise ValueError(f"unknown channel_source {channel_source!r}")

    def decorator(fn: ScoreFn) -> ScoreFn:
        old = CRITERIA.get(name) if name in CRITERIA else None
        if old is not None and (granularity in old.granularities or old.needs_grad != needs_grad):
            where = " for structured pruning" if granularity == "structured" else ""
            raise ValueError(f"criterion {name!r} is already registered{where}")
        if granularity == "structured":
            new = Criterion(name, old.score if old else None, needs_grad, fn, channel_source)
        else:
            new = Criterion(name, fn, needs_grad)
            if old is not None:
                new = dataclasses.replace(
                    new, channel_score=old.channel_score, channel_source=old.channel_source
                )
        CRITERIA.register(name, new, replace=True)
        return fn

    return decorator


def get_criterion(name: str, granularity: str | None = None) -> Criterion:
    """Return the registered criterion ``name``; raise SpecError naming it if unknown, or if it
    cannot score ``granularity`` (when given)."""
    criterion = CRITERIA.get(name)
    if granularity is not None and granularity not in criterion.granularities:
        able = ", ".join(sorted(n for n, c in CRITERIA.items() if granularity in c.granularities))
        raise SpecError(
            f"criterion {name!r} cannot score {granularity} pruning (criteria that can: {able})"
        )
    return criterion


def criteria_for(granularity: str) -> tuple[str, ...]:
    """Names of the registered criteria that can score ``granularity``, sorted."""
    return tuple(sorted(n for n, c in CRITERIA.items() if granularity in c.granularities))


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


# Channel criteria: ``weight`` has its output channels first; one score per output channel.


def _rows(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], -1)


@register_criterion("l1", granularity="structured")
def l1_norm(weight: Tensor, grad: Tensor | None) -> Tensor:
    """L1 norm of each output channel's filter."""
    return _rows(weight).abs().sum(dim=1)


@register_criterion("l2", granularity="structured")
def l2_norm(weight: Tensor, grad: Tensor | None) -> Tensor:
    """L2 norm of each output channel's filter."""
    return _rows(weight).norm(dim=1)


@register_criterion("bn_scale", granularity="structured", channel_source="batchnorm")
def bn_scale(weight: Tensor, grad: Tensor | None) -> Tensor:
    """|gamma| of the BatchNorm that normalises the channel (network slimming)."""
    return weight.abs()


@register_criterion("taylor", needs_grad=True, granularity="structured")
def taylor_channel(weight: Tensor, grad: Tensor | None) -> Tensor:
    """Sum of |w · dL/dW| over the channel's filter."""
    assert grad is not None
    return _rows(weight * grad).abs().sum(dim=1)


@register_criterion("fpgm", granularity="structured")
def fpgm(weight: Tensor, grad: Tensor | None) -> Tensor:
    """Summed distance of each filter to all others: filters near the geometric median are
    the most replaceable by the rest (He et al., 2019)."""
    rows = _rows(weight).float()
    return torch.cdist(rows, rows).sum(dim=1)


@register_criterion("random", granularity="structured")
def random_channel(weight: Tensor, grad: Tensor | None) -> Tensor:
    """Uniform noise per channel: the baseline (seeded by the trial)."""
    return torch.rand(weight.shape[0], dtype=weight.dtype, device=weight.device)


def calibration_gradients(model: nn.Module, task: Task, layers: list[str]) -> dict[str, Tensor]:
    """Mean over ``task.calibration_batches`` training batches of ``|dL/dW|`` for each layer.

    Gradients are computed here, on the device ``model`` is on and in fp32 (an estimate, not
    a training step), on a fresh graph: never read from whatever ``.grad`` the model happens
    to hold; the model's parameters and ``.grad`` are left untouched.
    """
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in layers]
    totals = [torch.zeros_like(w) for w in weights]
    device = weights[0].device if weights else torch.device("cpu")
    was_training = model.training
    model.eval()  # no dropout noise in the estimate; batch-norm uses its running statistics
    n = 0
    # A shuffling DataLoader draws its order from the global RNG: fix it, so that the same
    # batches are used whenever this runs (a trial and its replay), and restore it after.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            for batch in task.batches("train", shuffle=True, seed=0):
                batch = to_device(batch, device)
                loss = task.loss_of(task.outputs(model, batch), batch)
                grads = torch.autograd.grad(loss, weights)
                for total, g in zip(totals, grads, strict=True):
                    total += g.abs()
                n += 1
                if n == task.calibration_batches:
                    break
        finally:
            model.train(was_training)
    return {name: total / max(n, 1) for name, total in zip(layers, totals, strict=True)}
