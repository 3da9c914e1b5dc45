"""The study's Pareto front as Optuna computes it, without reading every trial whole.

``study.best_trials`` deep-copies every trial of the study, which a study of 10,000 trials
reads whole from its database first (tens of seconds). :func:`front_trials` finds the same
trials from the states and values of all trials (:mod:`autoprune.study.trials`) and reads only
them whole; a command computes it once and passes it on.

Code that asks for the front after every trial (the front-weights and front-table callbacks,
early stopping, the sampler's window) uses :func:`current_front`, which keeps it up to date from
the trials that finished since the last call.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial

from autoprune.study import _optuna
from autoprune.study.trials import check_numbered, full_trials, trial_summaries


def front_trials(
    study: optuna.Study, trials: Sequence[FrozenTrial] | None = None
) -> list[FrozenTrial]:
    """``study.best_trials`` (the feasible front when trials have constraints), whole, in trial
    order, without Optuna's deep copy: read them, never change them.

    Args:
        trials: The study's trials as :func:`autoprune.study.trials.trial_summaries` reads
            them, if the caller has them already (None: read here).
    """
    summaries = trial_summaries(study) if trials is None else trials
    front = _optuna.pareto_front(summaries, study.directions)
    return full_trials(study, [t.number for t in front])


def front_numbers(study: optuna.Study, trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the front trials among ``trials`` (summaries of all the study's trials)."""
    return {t.number for t in _optuna.pareto_front(trials, study.directions)}


class FrontTracker:
    """A study's front, updated from the trials that finished since the last update.

    The front of the trials so far plus new ones is the front of the old front plus the new
    ones, so an update costs the new trials, those still unfinished and the front, not the
    study.
    """

    def __init__(self) -> None:
        self.front: list[FrozenTrial] = []
        self._seen = 0  # trials[:_seen] were looked at
        self._pending: set[int] = set()  # of those, the numbers that had not finished

    def update(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """The front after ``trials`` (all the study's, in number order, as ``get_trials``
        gives them); returns the trials that finished since the last update."""
        check_numbered(trials)
        looked = [trials[i] for i in sorted(self._pending)] + list(trials[self._seen :])
        self._seen = len(trials)
        new = [t for t in looked if t.state.is_finished()]
        self._pending = {t.number for t in looked if not t.state.is_finished()}
        if new:
            self.front = _optuna.pareto_front(
                sorted([*self.front, *new], key=lambda t: t.number), study.directions
            )
        return new


_TRACKERS: weakref.WeakKeyDictionary[optuna.Study, FrontTracker] = weakref.WeakKeyDictionary()


def current_front(study: optuna.Study) -> list[FrozenTrial]:
    """The study's front now, kept by a :class:`FrontTracker` per study object: for code
    that asks after every trial. Trials as the study's storage holds them (in a trial loop,
    without their bulky records: read those with :func:`front_trials`)."""
    tracker = _TRACKERS.get(study)
    if tracker is None:
        tracker = _TRACKERS[study] = FrontTracker()
    tracker.update(study, study.get_trials(deepcopy=False))
    return tracker.front


def score_sign(study: optuna.Study) -> float:
    """1.0 when the study's accuracy objective is maximised, -1.0 when a lower score is better
    (a task with ``higher_is_better=False``): ``sign * accuracy`` is always "more is better"."""
    return 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
