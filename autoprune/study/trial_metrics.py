"""A trial's numbers by name, whatever objectives its study has.

Objectives are looked up by name in ``study.metric_names`` ("accuracy", the validation
accuracy, always first; then one or more size objectives, all minimised); other numbers a trial
records (test accuracy, density, ...) are numeric user attrs.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial

from autoprune.study.record import recorded_dense

ACCURACY = "accuracy"
# The objectives of a study that names none (made before autoprune named them): the
# default ones (autoprune.measure.DEFAULT_OBJECTIVES; a test holds them equal).
METRIC_NAMES = ("accuracy", "nonzero_params")
# User attrs that are bookkeeping, not measurements.
_NOT_METRICS = {"seed"}


def metric_names(study: optuna.Study) -> list[str]:
    """The study's objective names (autoprune sets them; older studies get the defaults)."""
    return list(study.metric_names or METRIC_NAMES)


def size_metric(study: optuna.Study) -> str:
    """The study's first size objective (the first objective that is not accuracy)."""
    return next(name for name in metric_names(study) if name != ACCURACY)


def trial_metrics(
    trial: FrozenTrial, names: list[str], *, total_params: float | None = None
) -> dict[str, float]:
    """The trial's objective values by name, then its numeric user attrs.

    ``nonzero_params`` is always there: an objective, a user attr, or ``density *
    total_params`` (the study's dense total) for a study that minimises another size.
    """
    metrics = dict(zip(names, map(float, trial.values or []), strict=False))
    for key, value in trial.user_attrs.items():
        if key not in metrics and key not in _NOT_METRICS and _is_number(value):
            metrics[key] = float(value)
    if "nonzero_params" not in metrics and total_params and "density" in metrics:
        metrics["nonzero_params"] = float(round(metrics["density"] * total_params))
    return metrics


def study_total_params(study: optuna.Study) -> float | None:
    """The dense model's prunable weights, as recorded in an autoprune study."""
    return recorded_dense(study).get("total_params")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
