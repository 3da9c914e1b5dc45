"""Criteria: how much each weight, or each output channel, matters. Low scores are pruned first.

A criterion scores with a function ``(weight, stats) -> scores``: for unstructured pruning one
score per weight (``scores.shape == weight.shape``), for structured pruning one score per output
channel (``scores.shape == (weight.shape[0],)``). ``stats`` is the layer's
:class:`~autoprune.pruning.calibration.LayerStats`: the calibration statistics the criterion
declares in ``needs`` (``grad``: mean ``|dL/dW|``; ``grad_sq``: mean ``(dL/dW)**2``;
``input_norm``: the norm of each input feature), measured by
:func:`~autoprune.pruning.calibration.calibrate`; the others are None. Criteria live in one
name → criterion registry so that a trial can choose one by name; a criterion may score either
granularity, or both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from autoprune._registry import Registry
from autoprune.errors import SpecError
from autoprune.pruning.calibration import LayerStats, check_needs

ScoreFn = Callable[[Tensor, LayerStats], Tensor]
# What a criterion that needs no statistic is given.
NO_STATS = LayerStats()


GRANULARITIES = ("unstructured", "structured")
# What a channel criterion scores: the weight of a Linear/Conv layer, or a BatchNorm's scale.
CHANNEL_SOURCES = ("layer", "batchnorm")


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A named criterion and the calibration statistics it ``needs``.

    Args:
        score: Scores every weight (unstructured pruning), or None.
        needs: Names of the statistics (:data:`~autoprune.pruning.calibration.STATISTICS`) its
            scoring functions read; empty for criteria of the weights alone.
        channel_score: Scores every output channel (structured pruning), or None.
        channel_source: ``"layer"``: ``channel_score`` gets a Linear/Conv weight (output
            channels first); ``"batchnorm"``: it gets the scale (gamma) of a BatchNorm.
    """

    name: str
    score: ScoreFn | None
    needs: tuple[str, ...] = ()
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
    needs: Iterable[str] = (),
    granularity: str = "unstructured",
    channel_source: str = "layer",
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator that adds a scoring function ``(weight, stats) -> scores`` to the registry
    under ``name``; ``needs`` names the statistics of ``stats`` it reads (e.g. ``("grad",)``).

    A name may be registered once per granularity (e.g. ``taylor`` scores weights and
    channels); both registrations must need the same statistics.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}")
    if channel_source not in CHANNEL_SOURCES:
        raise ValueError(f"unknown channel_source {channel_source!r}")
    needs = check_needs(needs)

    def decorator(fn: ScoreFn) -> ScoreFn:
        old = CRITERIA.get(name) if name in CRITERIA else None
        if old is not None and (granularity in old.granularities or set(old.needs) != set(needs)):
            where = " for structured pruning" if granularity == "structured" else ""
            raise ValueError(f"criterion {name!r} is already registered{where}")
        if granularity == "structured":
            new = Criterion(name, old.score if old else None, needs, fn, channel_source)
        else:
            new = Criterion(name, fn, needs)
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


def statistics_for(names: Iterable[str]) -> tuple[str, ...]:
    """The statistics that the criteria ``names`` need together, in a fixed order."""
    needed = {stat for name in names for stat in get_criterion(name).needs}
    return tuple(sorted(needed))


@register_criterion("magnitude")
def magnitude(weight: Tensor, stats: LayerStats) -> Tensor:
    """|w|: small weights matter least."""
    return weight.abs()


@register_criterion("random")
def random(weight: Tensor, stats: LayerStats) -> Tensor:
    """Uniform noise: the baseline any criterion must beat (seeded by the trial)."""
    return torch.rand(weight.shape, dtype=weight.dtype, device=weight.device)


@register_criterion("sensitivity", needs=("grad",))
def sensitivity(weight: Tensor, stats: LayerStats) -> Tensor:
    """|dL/dW|, the article's S: weights the loss barely reacts to matter least."""
    assert stats.grad is not None
    return stats.grad.clone()


@register_criterion("taylor", needs=("grad",))
def taylor(weight: Tensor, stats: LayerStats) -> Tensor:
    """|w · dL/dW|: first-order estimate of the loss change when the weight is removed."""
    assert stats.grad is not None
    return (weight * stats.grad).abs()


@register_criterion("wanda", needs=("input_norm",))
def wanda(weight: Tensor, stats: LayerStats) -> Tensor:
    """|w_ij| · ||X_j||: a weight matters as much as the inputs it multiplies are large
    (Sun et al., 2023; norms over the calibration batches)."""
    assert stats.input_norm is not None
    return weight.abs() * stats.input_norm


@register_criterion("fisher", needs=("grad_sq",))
def fisher(weight: Tensor, stats: LayerStats) -> Tensor:
    """w² · E[g²]: the loss increase the diagonal empirical Fisher predicts when the weight is
    removed (up to a factor 1/2), E[g²] over calibration batch gradients."""
    assert stats.grad_sq is not None
    return weight.square() * stats.grad_sq


# Channel criteria: ``weight`` has its output channels first; one score per output channel.


def _rows(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], -1)


@register_criterion("l1", granularity="structured")
def l1_norm(weight: Tensor, stats: LayerStats) -> Tensor:
    """L1 norm of each output channel's filter."""
    return _rows(weight).abs().sum(dim=1)


@register_criterion("l2", granularity="structured")
def l2_norm(weight: Tensor, stats: LayerStats) -> Tensor:
    """L2 norm of each output channel's filter."""
    return _rows(weight).norm(dim=1)


@register_criterion("bn_scale", granularity="structured", channel_source="batchnorm")
def bn_scale(weight: Tensor, stats: LayerStats) -> Tensor:
    """|gamma| of the BatchNorm that normalises the channel (network slimming)."""
    return weight.abs()


@register_criterion("taylor", needs=("grad",), granularity="structured")
def taylor_channel(weight: Tensor, stats: LayerStats) -> Tensor:
    """Sum of |w · dL/dW| over the channel's filter."""
    assert stats.grad is not None
    return _rows(weight * stats.grad).abs().sum(dim=1)


@register_criterion("wanda", needs=("input_norm",), granularity="structured")
def wanda_channel(weight: Tensor, stats: LayerStats) -> Tensor:
    """Sum of |w_ij| · ||X_j|| over the channel's filter."""
    return _rows(wanda(weight, stats)).sum(dim=1)


@register_criterion("fisher", needs=("grad_sq",), granularity="structured")
def fisher_channel(weight: Tensor, stats: LayerStats) -> Tensor:
    """Sum of w² · E[g²] over the channel's filter (the diagonal Fisher's estimate of the loss
    increase when the whole channel goes, its weights' interactions ignored)."""
    return _rows(fisher(weight, stats)).sum(dim=1)


@register_criterion("fpgm", granularity="structured")
def fpgm(weight: Tensor, stats: LayerStats) -> Tensor:
    """Summed distance of each filter to all others: filters near the geometric median are
    the most replaceable by the rest (He et al., 2019)."""
    rows = _rows(weight).float()
    return torch.cdist(rows, rows).sum(dim=1)


@register_criterion("random", granularity="structured")
def random_channel(weight: Tensor, stats: LayerStats) -> Tensor:
    """Uniform noise per channel: the baseline (seeded by the trial)."""
    return torch.rand(weight.shape[0], dtype=weight.dtype, device=weight.device)
