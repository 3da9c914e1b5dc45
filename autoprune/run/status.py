"""Where a study stands, across all its workers: counts, pace, front, workers, stuck trials.

Computed from the storage alone (any worker, any machine), for ``autoprune status`` and the
progress display of a search, from trial summaries (:mod:`autoprune.study.trials`): states,
values, times and the few small attrs it counts with, never a trial's whole record.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from autoprune.run.budget import COUNT_ATTRS, STATE_WORDS, WORKER_ATTR, counted
from autoprune.study import _optuna
from autoprune.study.fidelity import FIDELITY_ATTR, compute, is_full
from autoprune.study.record import recorded_dense, recorded_target
from autoprune.study.trial_metrics import metric_names
from autoprune.study.trials import trial_summaries

SPARSITY_LEVELS = (0.5, 0.75, 0.9, 0.95)
# The user attrs a status reads from each trial.
STATUS_ATTRS = (*COUNT_ATTRS, WORKER_ATTR, "density")


@dataclasses.dataclass(frozen=True)
class WorkerSeen:
    """A worker that ran trials of the study recently."""

    worker: str
    trials: int
    running: int
    last_seen_s: float  # seconds ago


@dataclasses.dataclass(frozen=True)
class StudyStatus:
    """A study's state; see :func:`study_status`."""

    name: str
    target: int | None
    states: dict[str, int]  # every word of STATE_WORDS, 0 included
    counted: int  # trials that count toward the target
    done: int  # counted trials that have finished
    front_size: int
    hypervolume: float | None
    trials_per_hour: float | None
    best_at_sparsity: dict[float, tuple[float, int] | None]  # level -> (accuracy, trial)
    workers: list[WorkerSeen]
    long_running: list[tuple[int, str, float]]  # (trial, worker, seconds running)
    # A study with fidelity (autoprune.study.fidelity); else 0, 0 and None.
    screened: int = 0  # complete screened trials
    full: int = 0  # complete full-fidelity trials
    compute: float | None = None  # fine-tune compute of the counted trials, in full trials

    @property
    def progress(self) -> float:
        """Toward the target: finished trials, or with fidelity the compute spent."""
        return self.done if self.compute is None else self.compute


def study_status(
    study: optuna.Study,
    *,
    recent: float = 900.0,
    long_factor: float = 3.0,
    long_floor: float = 60.0,
    now: float | None = None,
) -> StudyStatus:
    """Count the study's trials and measure its pace, front and workers.

    Args:
        recent: A worker is listed if it started or finished a trial this many seconds ago.
        long_factor, long_floor: A running trial is suspiciously long once it has run
            ``long_factor`` times the median complete trial, and at least ``long_floor`` s.
        now: The current time (``time.time()``), for tests.
    """
    now = time.time() if now is None else now
    trials = trial_summaries(study, user_attrs=STATUS_ATTRS)
    states = Counter(STATE_WORDS[t.state] for t in trials)
    kept = counted(trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    full = [t for t in complete if is_full(t)]
    front = _optuna.pareto_front(complete, study.directions)
    fidelity = any(FIDELITY_ATTR in t.user_attrs for t in trials)
    return StudyStatus(
        name=study.study_name,
        target=recorded_target(study),
        states={word: states[word] for word in STATE_WORDS.values()},
        counted=len(kept),
        done=sum(t.state.is_finished() for t in kept),
        front_size=len(front),
        hypervolume=hypervolume(study, front),
        trials_per_hour=_pace(trials, now),
        best_at_sparsity=_best_at_sparsity(study, full),
        workers=_workers(trials, now, recent),
        long_running=_long_running(trials, now, long_factor, long_floor),
        screened=len(complete) - len(full) if fidelity else 0,
        full=len(full) if fidelity else 0,
        compute=compute([t for t in kept if t.state.is_finished()]) if fidelity else None,
    )


def hypervolume(study: optuna.Study, front: Sequence[FrozenTrial]) -> float | None:
    """Hypervolume of ``front`` in a box normalised by the dense model: each size objective
    divided by the dense model's value, accuracy from 0. In [0, 1]; None without a dense
    value for some objective or without a front."""
    dense = recorded_dense(study)
    names = _metric_names(study)
    if not front or any(d == StudyDirection.MINIMIZE and not dense.get(n) for n, d in names):
        return None
    losses = [
        [
            -v if d == StudyDirection.MAXIMIZE else v / dense[n]
            for v, (n, d) in zip(t.values, names, strict=True)
        ]
        for t in front
    ]
    reference = [0.0 if d == StudyDirection.MAXIMIZE else 1.0 for _, d in names]
    points = np.minimum(np.asarray(losses, dtype=float), reference)  # clip into the box
    return float(_optuna.hypervolume(points, np.asarray(reference)))


def _metric_names(study: optuna.Study) -> list[tuple[str, StudyDirection]]:
    return list(zip(metric_names(study), study.directions, strict=True))


def _when(trial: FrozenTrial) -> float | None:
    stamp = trial.datetime_complete or trial.datetime_start
    return stamp.timestamp() if stamp is not None else None  # naive stamps are local time


def _pace(trials: Sequence[FrozenTrial], now: float, window: float = 3600.0) -> float | None:
    """Trials finished per hour over the last hour (or since the first of them started)."""
    recent = [
        t
        for t in trials
        if t.state.is_finished()
        and t.datetime_complete is not None
        and now - t.datetime_complete.timestamp() <= window
    ]
    starts = [t.datetime_start.timestamp() for t in recent if t.datetime_start is not None]
    if not recent or not starts:
        return None
    return len(recent) * 3600.0 / max(now - min(starts), 1e-9)


def _best_at_sparsity(
    study: optuna.Study, complete: Sequence[FrozenTrial]
) -> dict[float, tuple[float, int] | None]:
    """Best validation accuracy among trials at least as sparse as each level."""
    at = [name for name, _ in _metric_names(study)].index("accuracy")
    best: dict[float, tuple[float, int] | None] = {}
    for level in SPARSITY_LEVELS:
        fits = [t for t in complete if 1.0 - t.user_attrs.get("density", 1.0) >= level - 1e-12]
        top = max(fits, key=lambda t: (t.values[at], -t.number), default=None)
        best[level] = None if top is None else (top.values[at], top.number)
    return best


def _workers(trials: Sequence[FrozenTrial], now: float, recent: float) -> list[WorkerSeen]:
    seen: dict[str, dict[str, Any]] = {}
    for t in trials:
        name, when = t.user_attrs.get(WORKER_ATTR), _when(t)
        if name is None or when is None:
            continue
        entry = seen.setdefault(name, {"trials": 0, "running": 0, "last": when})
        entry["trials"] += 1
        entry["running"] += t.state == TrialState.RUNNING
        entry["last"] = max(entry["last"], when)
    return [
        WorkerSeen(name, e["trials"], e["running"], now - e["last"])
        for name, e in sorted(seen.items(), key=lambda item: -item[1]["last"])
        if now - e["last"] <= recent or e["running"]
    ]


def _long_running(
    trials: Sequence[FrozenTrial], now: float, factor: float, floor: float
) -> list[tuple[int, str, float]]:
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.state == TrialState.COMPLETE and t.datetime_start and t.datetime_complete
    ]
    limit = max(floor, factor * statistics.median(durations)) if durations else floor
    return [
        (t.number, str(t.user_attrs.get(WORKER_ATTR, "?")), now - t.datetime_start.timestamp())
        for t in trials
        if t.state == TrialState.RUNNING
        and t.datetime_start is not None
        and now - t.datetime_start.timestamp() > limit
    ]
