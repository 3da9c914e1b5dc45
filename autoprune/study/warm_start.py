"""The pruning heuristics of the literature as baselines and as warm starts.

:func:`baseline` prunes and fine-tunes by one heuristic allocation (``autoprune prune``);
:class:`WarmStart` names the heuristics that a new study enqueues as its first trials (magnitude
allocations for unstructured spaces, uniform L1 channel pruning for structured ones), so that the
searched front is never worse than them at the same fine-tuning budget. In a space that
searches quantization each heuristic is also tried quantized ("prune then int8"), so that the
joint front is never worse than quantizing the best heuristic either.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from autoprune._registry import from_dict, to_dict
from autoprune.errors import SpecError
from autoprune.pruning.allocation import get_allocation
from autoprune.pruning.policy import SCHEDULES
from autoprune.pruning.structured import group_sizes, kept_channels
from autoprune.study.space import SearchSpace, heuristic_params, structured_heuristic_params
from autoprune.task import Task

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """Which heuristics, at which target sparsities, a new study tries first.

    Args:
        allocations: Names of registered allocations (``uniform``, ``global``, ``lamp``,
            ``erk``); an empty list turns the unstructured warm starts off.
        sparsities: Target sparsities, each in [0, 1). Targets outside the search space's
            sparsity bounds are skipped.
        schedules: The schedules each heuristic is tried with (those the space has).
        extreme_allocations: Allocations also tried at the extreme targets (those of
            ``sparsities`` from ``extreme_from`` up), where the best heuristic changes (ERK or
            uniform sometimes beat LAMP at 95% and more); those in ``allocations`` are not
            repeated. They come after all of ``allocations``' warm starts, so that a small
            budget's ``limit`` keeps the main heuristics first. An empty list turns them off.
        extreme_from: The lowest target sparsity that counts as extreme, in [0, 1].
        channel_sparsities: Structured spaces: the fractions of channels that L1 channel
            pruning removes from every channel group (uniform L1, ``l1-uniform@0.5``), and the
            same with every removable block removed as well (``l1-uniform@0.5+blocks``) when
            the space has blocks; an empty list turns them off. A conv whose input and output
            channels both lose the fraction ``r`` keeps about ``(1 - r)**2`` of its MACs, so the
            default 0.2, 0.3, 0.5, 0.65 cut the MACs of a conv-to-conv network about 1.5x,
            2x, 4x and 8x. Fractions outside the space's ``channel_sparsity`` bounds are
            skipped.

    Raises:
        SpecError: Naming the first bad allocation or sparsity.
    """

    allocations: Sequence[str] = ("lamp", "global")
    sparsities: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.98)
    schedules: Sequence[str] = ("oneshot", "gradual")
    extreme_allocations: Sequence[str] = ("erk", "uniform")
    extreme_from: float = 0.95
    channel_sparsities: Sequence[float] = (0.2, 0.3, 0.5, 0.65)

    def __post_init__(self) -> None:
        for field in ("allocations", "extreme_allocations"):
            names = getattr(self, field)
            if isinstance(names, str):
                raise SpecError(f"{field} must be a list, got {names!r}")
            for name in names:
                get_allocation(name)
            object.__setattr__(self, field, tuple(names))
        if (
            isinstance(self.extreme_from, bool)
            or not isinstance(self.extreme_from, (int, float))
            or not 0.0 <= self.extreme_from <= 1.0
        ):
            raise SpecError(f"extreme_from must be a number in [0, 1], got {self.extreme_from!r}")
        object.__setattr__(self, "extreme_from", float(self.extreme_from))
        for field in ("sparsities", "channel_sparsities"):
            values = getattr(self, field)
            if isinstance(values, (str, int, float)):
                raise SpecError(f"{field} must be a list, got {values!r}")
            for value in values:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not 0.0 <= value < 1.0
                ):
                    raise SpecError(f"{field} must be numbers in [0, 1), got {value!r}")
            object.__setattr__(self, field, tuple(float(v) for v in values))
        if isinstance(self.schedules, str) or not all(s in SCHEDULES for s in self.schedules):
            raise SpecError(
                f"schedules must be a list of {', '.join(SCHEDULES)}, got {self.schedules!r}"
            )
        object.__setattr__(self, "schedules", tuple(self.schedules))

    def heuristics(self) -> list[tuple[str, float, str]]:
        """``(schedule, target, allocation)`` of each unstructured warm start, in order: every
        allocation at every target per schedule, then the extreme allocations at the extreme
        targets."""
        main = [
            (schedule, target, name)
            for schedule in self.schedules
            for target in self.sparsities
            for name in self.allocations
        ]
        extra = [name for name in self.extreme_allocations if name not in self.allocations]
        extreme = [
            (schedule, target, name)
            for schedule in self.schedules
            for target in self.sparsities
            if target >= self.extreme_from
            for name in extra
        ]
        return main + extreme

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WarmStart:
        return from_dict(cls, data, "warm-start key")


# What a new study tries first when its creator says nothing (a spec's default too).
DEFAULT_WARM_START = WarmStart()


def enqueue_warm_starts(
    study: optuna.Study,
    task: Task,
    space: SearchSpace,
    layers: Sequence[str],
    warm_start: WarmStart,
    *,
    groups: Sequence[str] = (),
    blocks: Sequence[str] = (),
    limit: int | None = None,
) -> int:
    """Enqueue each heuristic at each target as a trial of ``study``; return how many.

    A space with the unstructured granularity gets the magnitude heuristics (in the order
    schedule, sparsity, allocation, then the extreme allocations at the extreme targets in the
    same order: see :meth:`WarmStart.heuristics`; user attr ``warm_start`` e.g.
    ``"lamp@0.9"``, or ``"lamp@0.9 gradual"`` for a schedule other than one-shot). A space
    with the structured granularity gets L1 channel pruning of its channel ``groups`` at each of
    ``warm_start.channel_sparsities`` (``"l1-uniform@0.5"``; ``"l1-global@0.5"`` in a space
    with the global scope only), then, if it has removable ``blocks``, the same with all of
    them removed (``"l1-uniform@0.5+blocks"``); see
    :func:`~autoprune.study.space.structured_heuristic_params`. At most ``limit`` are
    enqueued, in that order, so that a small budget is not spent on warm starts alone.

    In a space with quantizations, each heuristic comes once per quantization, right after
    one another: ``"l1-uniform@0.5"``, then ``"l1-uniform@0.5+int8-static"`` ("prune then
    int8": the same pruning, fine-tuned, then quantized).

    Heuristics the space cannot express (e.g. no magnitude criterion, or a target outside its
    bounds) are skipped, and logged in one message; so are structured ones that keep the same
    channel counts as an earlier one (``round_to`` can round two ratios alike).
    """
    candidates: list[tuple[str, dict[str, Any] | None, Any]] = []
    if "unstructured" in space.granularities:
        for schedule, target, name in warm_start.heuristics():
            for quantization in space.quantizations:
                label = f"{name}@{target:g}"
                label += "" if schedule == "oneshot" else f" {schedule}"
                label += _suffix(quantization)
                params = heuristic_params(
                    space, name, target, task.model, layers, schedule, quantization
                )
                candidates.append((label, params, None))
    if "structured" in space.granularities:
        candidates += _structured_candidates(task, space, warm_start, groups, blocks)
    n, skipped, repeated = 0, [], []
    seen: dict[Any, str] = {}
    for label, params, key in candidates:
        if params is None:
            skipped.append(label)
        elif key is not None and key in seen:
            repeated.append(f"{label} (= {seen[key]})")
        elif limit is None or n < limit:
            study.enqueue_trial(params, user_attrs={"warm_start": label})
            n += 1
        if key is not None:
            seen.setdefault(key, label)
    if skipped:
        logger.info(
            "%d of %d warm starts are outside the search space and were skipped: %s",
            len(skipped),
            len(candidates),
            ", ".join(skipped),
        )
    if repeated:
        logger.info(
            "%d warm starts keep the same channels as an earlier one and were skipped: %s",
            len(repeated),
            ", ".join(repeated),
        )
    return n


def _structured_candidates(
    task: Task,
    space: SearchSpace,
    warm_start: WarmStart,
    groups: Sequence[str],
    blocks: Sequence[str],
) -> list[tuple[str, dict[str, Any] | None, Any]]:
    """Label, params (None: not in the space) and, in the layer scope, the kept channel
    counts, which tell apart ratios that ``round_to`` rounds to the same channels."""
    uniform = "layer" in space.scopes
    candidates = []
    for remove in (False, True) if blocks else (False,):
        for ratio in warm_start.channel_sparsities:
            for quantization in space.quantizations:
                label = f"l1-{'uniform' if uniform else 'global'}@{ratio:g}"
                label += ("+blocks" if remove else "") + _suffix(quantization)
                params = structured_heuristic_params(
                    space, ratio, groups, blocks, remove_blocks=remove, quantization=quantization
                )
                key = None
                if uniform and params is not None:
                    sizes = group_sizes(task.model, groups)
                    kept = tuple(kept_channels(c, ratio, space.round_to, u) for c, u in sizes)
                    key = (remove, kept, quantization)
                candidates.append((label, params, key))
    return candidates


def _suffix(quantization: str) -> str:
    return "" if quantization == "none" else f"+{quantization}"
