"""Constraints: where on the front the user cares, recorded with ``trial.set_constraint``.

Optuna 5's TPE, NSGA-II and GP samplers read constraints from the trials themselves, and
``study.best_trials`` then holds only feasible trials: the search concentrates where the
model is accurate and small enough.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from autoprune._registry import from_dict, to_dict
from autoprune.errors import SpecError


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Bounds a trial must meet to be feasible; None: no bound.

    Args:
        min_accuracy: Least validation accuracy, in [0, 1].
        max_density: Largest fraction of the prunable weights left nonzero, in (0, 1].
        max_params: Most nonzero prunable weights.

    Raises:
        SpecError: Naming the first bad bound and its value.
    """

    min_accuracy: float | None = None
    max_density: float | None = None
    max_params: int | None = None

    def __post_init__(self) -> None:
        for key, ok, what in (
            ("min_accuracy", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            ("max_density", lambda v: 0 < v <= 1, "a number in (0, 1]"),
            ("max_params", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
        ):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise SpecError(f"constraint {key} must be {what}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Constraints:
        return from_dict(cls, data, "constraint")

    def violations(
        self, metrics: Mapping[str, float], higher_is_better: bool = True
    ) -> dict[str, float]:
        """Constraint values of a trial's metrics for ``trial.set_constraint``: <= 0 is met.
        For a task whose score is better lower, ``min_accuracy`` bounds it from above."""
        values = {}
        if self.min_accuracy is not None:
            gap = self.min_accuracy - metrics["accuracy"]
            values["min_accuracy"] = gap if higher_is_better else -gap
        if self.max_density is not None:
            values["max_density"] = metrics["density"] - self.max_density
        if self.max_params is not None:
            values["max_params"] = metrics["nonzero_params"] - self.max_params
        return values
