"""Early stop of hopeless trials, by comparison with the study's current Pareto front.

Optuna's pruners do not work in multi-objective studies, so a trial stops itself: after its
first fine-tuning epoch, if its validation accuracy is more than ``margin`` below the best
accuracy the front already holds at its size or smaller, it raises ``optuna.TrialPruned`` and
ends PRUNED ("stopped early"), having cost one epoch instead of all of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from torch import nn

from autoprune._registry import from_dict, to_dict
from autoprune.errors import SpecError
from autoprune.pruning.masks import count_nonzero
from autoprune.study.front import current_front, score_sign
from autoprune.task import Task, accuracy
from autoprune.train import EpochHook


@dataclasses.dataclass(frozen=True)
class EarlyStop:
    """When a trial stops early.

    Args:
        margin: A trial stops when its validation accuracy after the first epoch is below the
            front's best accuracy at its density or lower minus ``margin``. None: never.

    Raises:
        SpecError: If ``margin`` is not a finite number >= 0.
    """

    margin: float | None = 0.1

    def __post_init__(self) -> None:
        m = self.margin
        if m is not None and (
            isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < math.inf
        ):
            raise SpecError(f"early_stop margin must be a finite number >= 0, got {m!r}")

    def check_scale(self, task: Task) -> None:
        """Check ``margin`` against the scale of ``task``'s score.

        Accuracy, the default score, is a fraction in [0, 1]: no trial is ever 1 or more
        below the front, so such a margin would stop no trial while saying early stop is on.
        It is a mistake (most likely a percentage, 5 for 0.05); ``early_stop = false`` is how
        to turn early stop off. A score of the task's own (``metric``, ``evaluate``: F1,
        perplexity) has its own units, which only its author knows: any finite margin.

        Raises:
            SpecError: If ``task`` is scored by accuracy and ``margin`` is 1 or more.
        """
        by_accuracy = task.evaluate is None and task.metric is accuracy
        if by_accuracy and self.margin is not None and self.margin >= 1:
            raise SpecError(
                "early_stop margin must be < 1 for a task scored by accuracy (a fraction: a "
                f"margin of 1 or more stops no trial; early_stop = false turns it off), got "
                f"{self.margin!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EarlyStop:
        return from_dict(cls, data, "early-stop key")

    def hook(self, trial: optuna.Trial, layers: Sequence[str]) -> EpochHook | None:
        """The ``on_epoch`` hook that stops ``trial``, or None if early stop is off."""
        if self.margin is None:
            return None
        margin = self.margin

        def on_epoch(epoch: int, model: nn.Module, accuracy: float) -> None:
            if epoch != 1:
                return
            nonzero, total = count_nonzero(model, layers)
            best = front_accuracy(trial.study, nonzero / total)
            sign = score_sign(trial.study)
            if best is not None and sign * accuracy < sign * best - margin:
                trial.set_user_attr("stopped_at", [epoch, accuracy, best])
                raise optuna.TrialPruned(
                    f"val accuracy {accuracy:.4f} after epoch {epoch}, the front has {best:.4f}"
                )

        return on_epoch


def front_accuracy(study: optuna.Study, density: float) -> float | None:
    """The best validation accuracy of a front trial at ``density`` or lower (None if none;
    the lowest for a task whose score is better lower).

    Accuracy is the study's first objective; density is every trial's user attr, so this
    holds whichever size objective the study minimises.
    """
    values = [
        t.values[0]
        for t in current_front(study)
        if t.user_attrs.get("density", math.inf) <= density + 1e-12
    ]
    sign = score_sign(study)
    return max(values, key=lambda v: sign * v) if values else None
