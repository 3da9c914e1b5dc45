"""Report data: the front and the trials as tables, and what the dashboard draws from them.

Computing is kept apart from drawing: everything here is a plain DataFrame or dict (tested on
its own); :mod:`autoprune.report.figures` draws them and :mod:`autoprune.report.page` lays
out the page.
"""

from __future__ import annotations

import datetime
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import optuna
import pandas as pd
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from autoprune.report.figures import loss_curves_figure, pareto_figure
from autoprune.study.front import front_trials, score_sign
from autoprune.study.sensitivity import SENSITIVITY_ATTR  # {layer: [[sparsity, accuracy], ...]}
from autoprune.study.setup import setup_if_any
from autoprune.study.trial_metrics import (
    ACCURACY,
    metric_names,
    size_metric,
    study_total_params,
    trial_metrics,
)

# Policy columns whose values are compared by their share of the front.
ASPECTS = ("criterion", "scope", "rule", "schedule", "granularity", "quantization")
# Fewer complete trials than this give importances that mean nothing.
MIN_TRIALS_FOR_IMPORTANCE = 4
_EPOCH = datetime.datetime(1970, 1, 1)
# Optuna's PRUNED is a trial stopped early as hopeless: "pruned" means something else here.
STATE_LABELS = {TrialState.PRUNED: "stopped"}

# Stable column order of the front table; per-layer sparsities follow as "sparsity:<layer>".
COLUMNS = [
    "trial",
    "accuracy",
    "test_accuracy",
    "nonzero_params",
    "density",
    "sparsity",
    "criterion",
    "scope",
    "rule",
    "alpha",
    "schedule",
]


__all__ = [
    "COLUMNS",
    "front_share",
    "hypervolume_2d",
    "hypervolume_history",
    "loss_curves_figure",
    "param_importances",
    "pareto_figure",
    "pareto_front",
    "sensitivity_frame",
    "states_over_time",
    "trial_details",
    "trials_frame",
]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per complete trial, front and dominated alike; ``on_front`` marks the front."""
    numbers = {t.number for t in front_trials(study)}
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names, total = metric_names(study), study_total_params(study)
    rows = [_row(t, t.number in numbers, names, total) for t in trials]
    frame = pd.DataFrame(rows, columns=[*COLUMNS, "on_front"] if not rows else None)
    return frame.sort_values("nonzero_params", kind="stable").reset_index(drop=True)


def pareto_front(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front (``study.best_trials``), one row per trial, smallest model first
    (by the study's first size objective).

    Columns: ``trial``, ``accuracy`` (validation), ``test_accuracy``, ``nonzero_params``,
    ``density``, ``sparsity``, ``criterion``, ``scope``, ``rule``, ``alpha``, ``schedule``, the
    study's other size objectives, then ``sparsity:<layer>`` (achieved) for every pruned layer.
    """
    names, total = metric_names(study), study_total_params(study)
    rows = [_row(t, True, names, total) for t in front_trials(study)]
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.DataFrame(rows).drop(columns="on_front")
    size = names[1] if len(names) > 1 and names[1] in frame else "nonzero_params"
    return frame.sort_values([size, "trial"]).reset_index(drop=True)


def _row(
    trial: FrozenTrial, on_front: bool, names: list[str], total: float | None
) -> dict[str, object]:
    attrs, policy = trial.user_attrs, trial.user_attrs.get("policy", {})
    metrics = trial_metrics(trial, names, total_params=total)
    row: dict[str, object] = {
        "trial": trial.number,
        "accuracy": metrics[ACCURACY],
        "test_accuracy": attrs.get("test_accuracy", float("nan")),
        "nonzero_params": int(metrics.get("nonzero_params", -1)),
        "density": attrs.get("density", float("nan")),
        "sparsity": 1.0 - attrs.get("density", float("nan")),
        "criterion": policy.get("criterion"),
        "scope": policy.get("scope"),
        "rule": policy.get("rule"),
        "alpha": policy.get("alpha") if policy.get("rule") == "mean" else float("nan"),
        "schedule": policy.get("schedule", "oneshot"),
    }
    if "granularity" in policy:
        row["granularity"] = policy["granularity"]
    if "quantization" in policy:  # trials deployed to ONNX Runtime (a quantizing study)
        row["quantization"] = policy["quantization"]
    for name in names:  # size objectives other than nonzero_params (bytes, macs, ...)
        row.setdefault(name, metrics[name])
    for layer, value in attrs.get("layer_sparsity", {}).items():
        row[f"sparsity:{layer}"] = value
    row["on_front"] = on_front
    return row


def relative_size(study: optuna.Study) -> Callable[[FrozenTrial], float]:
    """``size(trial)``: the trial's size objective as a fraction of the dense model's (its
    density when the dense value is not recorded). The study is read once, not per trial."""
    name, names, total = size_metric(study), metric_names(study), study_total_params(study)
    setup = setup_if_any(study)
    dense = None if setup is None else setup.dense.get(name)

    def size(trial: FrozenTrial) -> float:
        metrics = trial_metrics(trial, names, total_params=total)
        return metrics[name] / dense if dense else metrics.get("density", math.nan)

    return size


def hypervolume_2d(points: Iterable[tuple[float, float]]) -> float:
    """Area dominated by ``(x, y)`` points, both maximised, above the reference point (0, 0).

    The 2-D sweep: from the largest ``x`` down, each point adds the strip of ``y`` it raises
    the staircase by. Points with a negative coordinate add nothing.
    """
    area, top = 0.0, 0.0
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if x > 0 and y > top:
            area += x * (y - top)
            top = y
    return area


def hypervolume_history(study: optuna.Study) -> pd.DataFrame:
    """Hypervolume of the completed trials after each completion, in normalised space.

    Each trial is the point (decades of compression ``-log10(relative size)``, val accuracy);
    the reference point is the dense size at zero accuracy, so values are comparable across
    studies of one model. A score that is better lower counts as ``1 / (1 + score)``.
    Columns: ``trial``, ``completed``, ``hypervolume``.
    """
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    trials = sorted(trials, key=lambda t: (t.datetime_complete or _EPOCH, t.number))
    rows: list[dict[str, Any]] = []
    staircase: list[tuple[float, float]] = []
    relative = relative_size(study)
    sign = score_sign(study)
    for trial in trials:
        size = relative(trial)
        if size > 0 and math.isfinite(size):
            staircase = _step(staircase, (-math.log10(size), _quality(trial.values[0], sign)))
        value = hypervolume_2d(staircase)
        rows.append(
            {"trial": trial.number, "completed": trial.datetime_complete, "hypervolume": value}
        )
    return pd.DataFrame(rows, columns=["trial", "completed", "hypervolume"])


def _quality(score: float, sign: float) -> float:
    """The accuracy axis of the hypervolume: the score itself, or ``1 / (1 + score)`` for a
    score that is better lower (perplexity, error), so that zero is still the reference."""
    return float(score) if sign > 0 else 1.0 / (1.0 + max(float(score), 0.0))


def _step(
    staircase: list[tuple[float, float]], point: tuple[float, float]
) -> list[tuple[float, float]]:
    """The staircase (points none of which another covers) after ``point`` is added: only its
    points can matter to the next one. A point covers another that it equals or exceeds in both
    coordinates, without being equal to it."""

    def covers(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q != p and q[0] >= p[0] and q[1] >= p[1]

    if any(covers(q, point) for q in staircase):
        return staircase
    return [p for p in staircase if not covers(point, p)] + [point]


def states_over_time(study: optuna.Study) -> pd.DataFrame:
    """Cumulative trial counts by state over time (a running trial counts from its start;
    Optuna's PRUNED is labelled ``stopped``).

    Columns: ``time``, ``state``, ``count``.
    """
    events = sorted(
        (
            t.datetime_complete or t.datetime_start or _EPOCH,
            STATE_LABELS.get(t.state, t.state.name.lower()),
            t.number,
        )
        for t in study.get_trials(deepcopy=False)
    )
    counts: dict[str, int] = {}
    rows = []
    for time, state, _ in events:
        counts[state] = counts.get(state, 0) + 1
        rows.append({"time": time, "state": state, "count": counts[state]})
    return pd.DataFrame(rows, columns=["time", "state", "count"])


def front_share(frame: pd.DataFrame) -> pd.DataFrame:
    """How each criterion, scope, rule (and granularity) fares, from :func:`trials_frame`.

    Columns: ``aspect``, ``value``, ``trials``, ``on_front``, ``share_of_front`` (of the front's
    trials, the fraction with this value) and ``front_rate`` (of its trials, those on the front).
    """
    columns = ["aspect", "value", "trials", "on_front", "share_of_front", "front_rate"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    front_size = int(frame["on_front"].sum())
    rows = []
    for aspect in [a for a in ASPECTS if a in frame.columns]:
        for value, part in frame.groupby(aspect, sort=True):
            on_front = int(part["on_front"].sum())
            rows.append(
                {
                    "aspect": aspect,
                    "value": value,
                    "trials": len(part),
                    "on_front": on_front,
                    "share_of_front": on_front / front_size if front_size else 0.0,
                    "front_rate": on_front / len(part),
                }
            )
    return pd.DataFrame(rows, columns=columns)


def param_importances(study: optuna.Study) -> tuple[pd.DataFrame, str]:
    """Optuna's parameter importances for each objective; ``(frame, "")``, or an empty frame
    and the reason there are none (too few trials, nothing varied).

    Columns: ``objective``, ``param``, ``importance``.
    """
    columns = ["objective", "param", "importance"]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        reason = f"{len(complete)} complete trials; importances need {MIN_TRIALS_FOR_IMPORTANCE}"
        return pd.DataFrame(columns=columns), reason
    rows = []
    for i, name in enumerate(metric_names(study)):
        # fANOVA, seeded: the default (PED-ANOVA) looks at the best 10 % of trials, which in a
        # study of a few dozen is one or two, and then credits one parameter with everything.
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        sign = -1.0 if study.directions[i] == StudyDirection.MAXIMIZE else 1.0
        try:
            with warnings.catch_warnings():  # "few trials": the reason says it
                warnings.simplefilter("ignore", UserWarning)
                importances = optuna.importance.get_param_importances(
                    study, evaluator=evaluator, target=_objective(i, sign)
                )
        except (ValueError, RuntimeError) as e:  # e.g. no parameter common to all trials
            return pd.DataFrame(columns=columns), f"importances unavailable: {e}"
        rows += [{"objective": name, "param": p, "importance": v} for p, v in importances.items()]
    reason = "" if rows else "no parameter was searched in every complete trial"
    return pd.DataFrame(rows, columns=columns), reason


def _objective(index: int, sign: float) -> Callable[[FrozenTrial], float]:
    return lambda trial: sign * float(trial.values[index])


def sensitivity_frame(study: optuna.Study) -> pd.DataFrame:
    """Per-layer sensitivity curves, if the study stores them (study user attr
    ``"autoprune_sensitivity"`` = {layer: [[sparsity, accuracy], ...]}).

    Columns: ``layer``, ``sparsity``, ``accuracy``.
    """
    curves = study.user_attrs.get(SENSITIVITY_ATTR, {})
    rows = [
        {"layer": layer, "sparsity": float(s), "accuracy": float(a)}
        for layer, points in curves.items()
        for s, a in points
    ]
    return pd.DataFrame(rows, columns=["layer", "sparsity", "accuracy"])


def trial_details(study: optuna.Study, *, key_prefix: str = "") -> dict[str, dict[str, Any]]:
    """What the dashboard shows when a trial is clicked, for each complete trial, keyed by
    ``key_prefix + str(number)``: numbers, policy, per-layer sparsity and loss curves."""
    names, total = metric_names(study), study_total_params(study)
    details = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        policy = dict(trial.user_attrs.get("policy", {}))
        target = policy.pop("sparsity", {})
        metrics = trial_metrics(trial, names, total_params=total)
        details[f"{key_prefix}{trial.number}"] = {
            "study": study.study_name,
            "trial": trial.number,
            "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
            "policy": policy,
            "target_sparsity": target,
            "layer_sparsity": trial.user_attrs.get("layer_sparsity", {}),
            "history": trial.user_attrs.get("history", {}),
        }
    return details
