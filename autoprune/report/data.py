"""Report data: the front and the trials as tables, and what the dashboard draws from them.

Computing is kept apart from drawing: everything here is a plain DataFrame or dict (tested on
its own); :mod:`autoprune.report.figures` draws them and :mod:`autoprune.report.page` lays
out the page.

A study is read once per page (:func:`read_study`): every trial's number, state, values, times,
density and policy (for counts, fronts, shares and hypervolume), and whole records (loss
curves, per-layer sparsity) only of the trials the page shows: the front, and of the
dominated trials at most ``MAX_DOMINATED`` spread over the study, so that a page of a
10,000-trial study stays light in the browser.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from autoprune.report import importance
from autoprune.report.figures import loss_curves_figure, pareto_figure
from autoprune.study.fidelity import is_full, trial_fidelity
from autoprune.study.front import front_numbers, front_trials, score_sign
from autoprune.study.record import (
    SENSITIVITY_ATTR,  # {layer: [[sparsity, accuracy], ...]}
    recorded_dense,
)
from autoprune.study.trial_metrics import (
    ACCURACY,
    metric_names,
    size_metric,
    study_total_params,
    trial_metrics,
)
from autoprune.study.trials import full_trials, trial_summaries

# Policy columns whose values are compared by their share of the front.
ASPECTS = (
    "criterion",
    "scope",
    "rule",
    "schedule",
    "granularity",
    "quantization",
    "distill",
    "rewind",
)

# The Policy's recovery settings at the task's recipe, which its dicts leave out (the values
# of autoprune.pruning.policy.RECOVERY_DEFAULTS, a test holds them equal: that module imports
# torch, which reading commands never do).
RECOVERY_DEFAULTS: dict[str, object] = {"distill": 0.0, "lr_scale": 1.0, "rewind": False}
# Fewer complete trials than this give importances that mean nothing.
MIN_TRIALS_FOR_IMPORTANCE = importance.MIN_TRIALS
# Dominated trials a page shows at most (spread evenly over the study); every front trial is
# shown. Chromium draws and hovers 1,000 markers without lag.
MAX_DOMINATED = 1000
# The user attrs read from every trial: what counts, shares and hypervolume need.
SUMMARY_ATTRS = ("density", "policy")
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
    "StudyRead",
    "front_share",
    "hypervolume_2d",
    "hypervolume_history",
    "loss_curves_figure",
    "param_importances",
    "pareto_figure",
    "pareto_front",
    "read_study",
    "sensitivity_frame",
    "states_over_time",
    "trial_details",
    "trials_frame",
]


@dataclasses.dataclass(frozen=True)
class StudyRead:
    """What a page reads of one study (see the module docstring).

    Attributes:
        summaries: Every trial: number, state, values, times, constraints, density, policy.
        complete: The complete ones among them.
        front: The front trials, whole (``study.best_trials``).
        shown: The trials the page shows, whole: the front, and dominated ones spread
            evenly over the study (all of them if there are at most ``max_dominated``).
        dominated: How many complete trials are off the front.
    """

    summaries: list[FrozenTrial]
    complete: list[FrozenTrial]
    front: list[FrozenTrial]
    shown: list[FrozenTrial]
    dominated: int


def read_study(study: optuna.Study, *, max_dominated: int | None = MAX_DOMINATED) -> StudyRead:
    """Read what a page of ``study`` needs, once: the front is computed here, not again.
    ``max_dominated=None`` shows every trial."""
    summaries = trial_summaries(study, user_attrs=SUMMARY_ATTRS)
    complete = [t for t in summaries if t.state == TrialState.COMPLETE]
    on_front = front_numbers(study, complete)
    off = [t for t in complete if t.number not in on_front]
    limit = len(off) if max_dominated is None else max_dominated
    shown = full_trials(study, on_front | {t.number for t in importance.spread(off, limit)})
    front = [t for t in shown if t.number in on_front]
    return StudyRead(summaries, complete, front, shown, len(off))


def trials_frame(study: optuna.Study, read: StudyRead | None = None) -> pd.DataFrame:
    """One row per complete trial, front and dominated alike (given ``read``: per trial it
    shows); ``on_front`` marks the front, and ``fidelity`` screened trials in a study that
    has them (:mod:`autoprune.study.fidelity`: never on the front)."""
    read = read or read_study(study, max_dominated=None)
    numbers = {t.number for t in read.front}
    trials = [t for t in read.shown if t.state == TrialState.COMPLETE]
    names, total = metric_names(study), study_total_params(study)
    rows = [_row(t, t.number in numbers, names, total) for t in trials]
    if any(not is_full(t) for t in trials):  # screened beside full: say which is which
        for row, t in zip(rows, trials, strict=True):
            row["fidelity"] = trial_fidelity(t)
    frame = pd.DataFrame(rows, columns=[*COLUMNS, "on_front"] if not rows else None)
    frame = _with_recovery(frame)
    return frame.sort_values("nonzero_params", kind="stable").reset_index(drop=True)


def pareto_front(study: optuna.Study, front: Sequence[FrozenTrial] | None = None) -> pd.DataFrame:
    """The Pareto front (``study.best_trials``), one row per trial, smallest model first
    (by the study's first size objective).

    Columns: ``trial``, ``accuracy`` (validation), ``test_accuracy``, ``nonzero_params``,
    ``density``, ``sparsity``, ``criterion``, ``scope``, ``rule``, ``alpha``, ``schedule``, the
    study's other size objectives, then ``sparsity:<layer>`` (achieved) for every pruned layer.

    Args:
        front: The front trials, whole, if the caller has them (None: read here).
    """
    names, total = metric_names(study), study_total_params(study)
    front = front_trials(study) if front is None else front
    rows = [_row(t, True, names, total) for t in front]
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    frame = _with_recovery(pd.DataFrame(rows).drop(columns="on_front"))
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
        **_aspects(policy),
    }
    for name in names:  # size objectives other than nonzero_params (bytes, macs, ...)
        row.setdefault(name, metrics[name])
    for layer, value in attrs.get("layer_sparsity", {}).items():
        row[f"sparsity:{layer}"] = value
    row["on_front"] = on_front
    return row


def _aspects(policy: dict[str, Any]) -> dict[str, object]:
    """The policy columns of a row: the aspects of :func:`front_share`, and alpha."""
    row: dict[str, object] = {
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
    row |= {key: policy[key] for key in RECOVERY_DEFAULTS if key in policy}
    return row


def _with_recovery(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the recovery columns that some of its trials have filled in for the
    others (the task's own settings), placed after the other policy columns."""
    present = [key for key in RECOVERY_DEFAULTS if key in frame.columns]
    if not present:
        return frame
    frame = frame.copy()
    for key in present:
        frame[key] = [RECOVERY_DEFAULTS[key] if pd.isna(v) else v for v in frame[key]]
    others = [c for c in frame.columns if c not in present]
    at = max(others.index(c) for c in ("schedule", "granularity", "quantization") if c in others)
    return frame[others[: at + 1] + present + others[at + 1 :]]


def aspects_frame(read: StudyRead) -> pd.DataFrame:
    """For :func:`front_share`: every complete trial's policy aspects, and ``on_front``."""
    numbers = {t.number for t in read.front}
    rows = [
        {**_aspects(t.user_attrs.get("policy", {})), "on_front": t.number in numbers}
        for t in read.complete
    ]
    columns = ["criterion", "scope", "rule", "schedule", "on_front"]
    return _with_recovery(pd.DataFrame(rows, columns=columns if not rows else None))


def relative_size(study: optuna.Study) -> Callable[[FrozenTrial], float]:
    """``size(trial)``: the trial's size objective as a fraction of the dense model's (its
    density when the dense value is not recorded). The study is read once, not per trial."""
    name, names, total = size_metric(study), metric_names(study), study_total_params(study)
    dense = recorded_dense(study).get(name)
    index = names.index(name)

    def size(trial: FrozenTrial) -> float:
        if dense:  # the size objective (trial_metrics would read it from the values too)
            return float(trial.values[index]) / dense
        return trial_metrics(trial, names, total_params=total).get("density", math.nan)

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


def hypervolume_history(
    study: optuna.Study, complete: Sequence[FrozenTrial] | None = None
) -> pd.DataFrame:
    """Hypervolume of the completed trials after each completion, in normalised space.

    Each trial is the point (decades of compression ``-log10(relative size)``, val accuracy);
    the reference point is the dense size at zero accuracy, so values are comparable across
    studies of one model. A score that is better lower counts as ``1 / (1 + score)``.
    Columns: ``trial``, ``completed``, ``hypervolume``.

    Args:
        complete: The study's complete trials, if the caller has read them (summaries do).
    """
    if complete is None:
        complete = trial_summaries(study, user_attrs=SUMMARY_ATTRS, states=[TrialState.COMPLETE])
    trials = sorted(complete, key=lambda t: (t.datetime_complete or _EPOCH, t.number))
    rows: list[dict[str, Any]] = []
    staircase: list[tuple[float, float]] = []
    relative = relative_size(study)
    sign = score_sign(study)
    value = hypervolume_2d(staircase)
    for trial in trials:
        size = relative(trial)
        if size > 0 and math.isfinite(size):
            before = staircase
            staircase = _step(staircase, (-math.log10(size), _quality(trial.values[0], sign)))
            if staircase is not before:  # a covered point leaves the area as it was
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


def states_over_time(
    study: optuna.Study, trials: Sequence[FrozenTrial] | None = None
) -> pd.DataFrame:
    """Cumulative trial counts by state over time (a running trial counts from its start;
    Optuna's PRUNED is labelled ``stopped``).

    Columns: ``time``, ``state``, ``count``.

    Args:
        trials: Every trial of the study, if the caller has read them (summaries do).
    """
    trials = trial_summaries(study) if trials is None else trials
    events = sorted(
        (
            t.datetime_complete or t.datetime_start or _EPOCH,
            STATE_LABELS.get(t.state, t.state.name.lower()),
            t.number,
        )
        for t in trials
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


def param_importances(
    study: optuna.Study,
    complete: Sequence[FrozenTrial] | None = None,
    *,
    budget: float | None = None,
) -> tuple[pd.DataFrame, str]:
    """Optuna's parameter importances for each objective; ``(frame, "")``, or the frame of
    what was computed and the reason the rest is missing (too few trials, nothing varied,
    over ``budget`` CPU seconds; None: ``importance.BUDGET``). The evaluator and sample
    follow the study's size (:mod:`autoprune.report.importance`).

    Columns: ``objective``, ``param``, ``importance``.

    Args:
        complete: The study's complete trials, if the caller has them (params are read here
            for the sample only).
    """
    if complete is None:
        complete = trial_summaries(study, states=[TrialState.COMPLETE])
    _, n = importance.choose(len(complete))
    numbers = [t.number for t in importance.spread(complete, n)]
    sample = trial_summaries(study, states=[TrialState.COMPLETE], numbers=numbers, params=True)
    budget = importance.BUDGET if budget is None else budget
    return importance.param_importances(study, sample, metric_names(study), budget=budget)


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


def trial_details(
    study: optuna.Study, *, key_prefix: str = "", trials: Iterable[FrozenTrial] | None = None
) -> dict[str, dict[str, Any]]:
    """What the dashboard shows when a trial is clicked, for each complete trial (of
    ``trials``, whole, if given), keyed by ``key_prefix + str(number)``: numbers, policy,
    per-layer sparsity and loss curves."""
    names, total = metric_names(study), study_total_params(study)
    if trials is None:
        trials = full_trials(study, [t.number for t in trial_summaries(study)])
    details = {}
    for trial in trials:
        if trial.state != TrialState.COMPLETE:
            continue
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
