"""Pick one front trial by a rule: a floor on accuracy, a cap on size, or the knee."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial

from autoprune.errors import SpecError
from autoprune.study.front import front_trials, score_sign
from autoprune.study.trial_metrics import (
    ACCURACY,
    metric_names,
    size_metric,
    study_total_params,
    trial_metrics,
)


def front_metrics(
    study: optuna.Study, front: Sequence[FrozenTrial] | None = None
) -> list[tuple[FrozenTrial, dict[str, float]]]:
    """The front trials (``study.best_trials``, uncopied: read them only; ``front`` if the
    caller has read them whole) with their numbers by name."""
    names, total = metric_names(study), study_total_params(study)
    front = front_trials(study) if front is None else front
    return [(t, trial_metrics(t, names, total_params=total)) for t in front]


def pick(
    study: optuna.Study,
    *,
    min_accuracy: float | None = None,
    max_params: float | None = None,
    max_size: float | None = None,
    max_bytes: float | None = None,
    knee: bool = False,
    by: str | None = None,
    front: Sequence[FrozenTrial] | None = None,
) -> FrozenTrial:
    """Choose one front trial by exactly one rule.

    Args:
        min_accuracy: The smallest model (by ``by``) with at least this val accuracy (at
            most, for a task whose score is better lower).
        max_params: The most accurate model with at most this many nonzero prunable weights.
        max_size: The most accurate model whose ``by`` is at most this.
        max_bytes: The most accurate model whose deployed file (the ``bytes`` objective: its
            ``model.onnx`` in a study that searches quantization, else its ``model.pt``) is at
            most this many bytes.
        knee: The knee of the front in (accuracy, log10 size) space.
        by: The size objective (default: the study's first one, e.g. ``nonzero_params``).
        front: The study's front trials, whole, if the caller has read them (None: read).

    Raises:
        SpecError: If not exactly one rule is given, ``by`` is not a size objective of the
            study (``bytes`` for ``max_bytes``), or no front trial qualifies (the message says
            the closest there is).
    """
    rules = {
        "min_accuracy": min_accuracy,
        "max_params": max_params,
        "max_size": max_size,
        "max_bytes": max_bytes,
    }
    given = [name for name, value in rules.items() if value is not None] + ["knee"] * knee
    if len(given) != 1:
        raise SpecError(f"give exactly one of {', '.join([*rules, 'knee'])}, got {given or 0}")
    sizes = [name for name in metric_names(study) if name != ACCURACY]
    by = by or size_metric(study)
    if given[0] == "max_bytes" and "bytes" not in sizes:
        raise SpecError(
            f"study {study.study_name!r} does not measure bytes (its size objectives: "
            f"{', '.join(sizes)})"
        )
    if by not in sizes:
        raise SpecError(f"size objective must be one of {', '.join(sizes)}, got {by!r}")
    found = front_metrics(study, front)
    if not found:
        raise SpecError(f"study {study.study_name!r} has no completed trial to pick")
    choose = _CHOOSERS[given[0]]
    return copy.deepcopy(choose(found, by, rules.get(given[0]) or 0.0, score_sign(study)))


Front = list[tuple[FrozenTrial, dict[str, float]]]


def _smallest_above(front: Front, by: str, bar: float, sign: float) -> FrozenTrial:
    ok = [(m[by], -sign * m[ACCURACY], t.number, t) for t, m in front if _at_least(m, bar, sign)]
    if not ok:
        best = max((m[ACCURACY] for _, m in front), key=lambda a: sign * a)
        word = ">=" if sign > 0 else "<="
        raise SpecError(
            f"no front trial has val accuracy {word} {bar:g} (the best has {best:.4f})"
        )
    return min(ok, key=lambda row: row[:3])[3]


def _at_least(metrics: dict[str, float], bar: float, sign: float) -> bool:
    return sign * metrics[ACCURACY] >= sign * bar


def _most_accurate_under(key: str | None) -> Callable[[Front, str, float, float], FrozenTrial]:
    """The most accurate trial whose ``key`` (None: the size objective ``by``) is <= bar."""

    def choose(front: Front, by: str, bar: float, sign: float) -> FrozenTrial:
        metric = key or by
        ok = [(-sign * m[ACCURACY], m[metric], t.number, t) for t, m in front if m[metric] <= bar]
        if not ok:
            least = min(m[metric] for _, m in front)
            raise SpecError(f"no front trial has {metric} <= {bar:g} (the smallest has {least:g})")
        return min(ok, key=lambda row: row[:3])[3]

    return choose


def _knee(front: Front, by: str, _: float, sign: float) -> FrozenTrial:
    """The point farthest above the chord joining the two ends of the front, in normalised
    (log10 size, accuracy); with no point above it, the one nearest (smallest, most accurate).
    """
    points = sorted(
        (math.log10(max(m[by], 1e-12)), sign * m[ACCURACY], t.number, t) for t, m in front
    )
    xs, ys = [p[0] for p in points], [p[1] for p in points]

    def scaled(v: float, vs: list[float]) -> float:
        return (v - min(vs)) / (max(vs) - min(vs)) if max(vs) > min(vs) else 0.0

    norm = [(scaled(x, xs), scaled(y, ys), p[3]) for x, y, p in zip(xs, ys, points, strict=True)]
    (x0, y0), (x1, y1) = norm[0][:2], norm[-1][:2]
    gaps = [((y - y0) * (x1 - x0) - (x - x0) * (y1 - y0), t) for x, y, t in norm]
    best_gap, best_trial = max(gaps, key=lambda a: (a[0], -a[1].number))
    if best_gap > 1e-12:
        return best_trial
    return min(norm, key=lambda p: (math.hypot(p[0], 1.0 - p[1]), p[2].number))[2]


_CHOOSERS: dict[str, Callable[[Front, str, float, float], FrozenTrial]] = {
    "min_accuracy": _smallest_above,
    "max_params": _most_accurate_under("nonzero_params"),
    "max_size": _most_accurate_under(None),
    "max_bytes": _most_accurate_under("bytes"),
    "knee": _knee,
}
