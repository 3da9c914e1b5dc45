"""The pruning heuristics of the literature as baselines and as warm starts.

:func:`baseline` prunes and fine-tunes by one heuristic allocation (``autoprune prune``);
:class:`WarmStart` names the heuristics that a new study enqueues as its first trials, so that
the searched front is never worse than them at the same fine-tuning budget.
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
from autoprune.study.space import SearchSpace, heuristic_params
from autoprune.task import Task

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """Which heuristics, at which target sparsities, a new study tries first.

    Args:
        allocations: Names of registered allocations (``uniform``, ``global``, ``lamp``,
            ``erk``); an empty list turns warm starts off.
        sparsities: Target sparsities, each in [0, 1). Targets outside the search space's
            sparsity bounds are skipped.
        schedules: The schedules each heuristic is tried with (those the space has).

    Raises:
        SpecError: Naming the first bad allocation or sparsity.
    """

    allocations: Sequence[str] = ("lamp", "global")
    sparsities: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.98)
    schedules: Sequence[str] = ("oneshot", "gradual")

    def __post_init__(self) -> None:
        if isinstance(self.allocations, str):
            raise SpecError(f"allocations must be a list, got {self.allocations!r}")
        for name in self.allocations:
            get_allocation(name)
        if isinstance(self.sparsities, (str, int, float)):
            raise SpecError(f"sparsities must be a list, got {self.sparsities!r}")
        for value in self.sparsities:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"sparsities must be numbers in [0, 1), got {value!r}")
            if not 0.0 <= value < 1.0:
                raise SpecError(f"sparsities must be numbers in [0, 1), got {value!r}")
        if isinstance(self.schedules, str) or not all(s in SCHEDULES for s in self.schedules):
            raise SpecError(
                f"schedules must be a list of {', '.join(SCHEDULES)}, got {self.schedules!r}"
            )
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "allocations", tuple(self.allocations))
        object.__setattr__(self, "sparsities", tuple(float(v) for v in self.sparsities))

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
    limit: int | None = None,
) -> int:
    """Enqueue each heuristic at each target as a trial of ``study``; return how many.

    At most ``limit`` are enqueued (in the order schedule, sparsity, allocation), so that a
    small budget is not spent on warm starts alone.

    Each enqueued trial carries the user attr ``warm_start`` (e.g. ``"lamp@0.9"``, or
    ``"lamp@0.9 gradual"`` for a schedule other than one-shot). Heuristics the space cannot
    express (e.g. no magnitude criterion, or a structured-only space) are skipped, and
    logged in one message.
    """
    n, considered, skipped = 0, 0, []
    for schedule in warm_start.schedules:
        for target in warm_start.sparsities:
            for name in warm_start.allocations:
                label = f"{name}@{target:g}" + ("" if schedule == "oneshot" else f" {schedule}")
                params = heuristic_params(space, name, target, task.model, layers, schedule)
                considered += 1
                if params is None:
                    skipped.append(label)
                elif limit is None or n < limit:
                    study.enqueue_trial(params, user_attrs={"warm_start": label})
                    n += 1
    if skipped:
        logger.info(
            "%d of %d warm starts are outside the search space and were skipped: %s",
            len(skipped),
            considered,
            ", ".join(skipped),
        )
    return n
