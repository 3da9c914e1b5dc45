"""What counts toward a study's target, and the words the user reads for trial states.

Kept apart from :mod:`autoprune.run.worker` (which runs trials, and imports torch) so that
``autoprune status`` reads a study without importing what runs one.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.study.fidelity import FIDELITY_ATTR, PROMOTED_ATTR, trial_fidelity
from autoprune.study.storages import RESUMES_ATTR, retried_numbers
from autoprune.study.trials import check_numbered

WORKER_ATTR = "worker"  # trial user attr: "host:pid" of the worker that ran it
SURPLUS_ATTR = "surplus"  # trial user attr: started after the target was met; not counted
# The user attrs that :func:`counted` reads (trial summaries must carry them).
COUNT_ATTRS = (SURPLUS_ATTR, RESUMES_ATTR, FIDELITY_ATTR, PROMOTED_ATTR)
# Trial states in the words the user reads (PRUNED: stopped early as hopeless).
STATE_WORDS = {
    TrialState.COMPLETE: "complete",
    TrialState.FAIL: "failed",
    TrialState.PRUNED: "stopped",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def counted(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count toward a study's target: every trial (waiting, running or
    finished) except failed ones that were retried or resumed (the retry counts) and surplus
    ones."""
    trials = list(trials)
    retried = retried_numbers(trials)
    return [t for t in trials if t.number not in retried and not t.user_attrs.get(SURPLUS_ATTR)]


def weight(trial: FrozenTrial, reserve: float = 0.0) -> float:
    """What ``trial`` counts toward a study's target, in full trials of fine-tune compute:
    1 for a full trial, its fidelity for a screened one (:mod:`autoprune.study.fidelity`).

    ``reserve``, the study's promoted fraction (0 without fidelity), is set aside by each
    screened trial for the promotions it earns, which then count nothing more: so that a
    study that reaches its target of sampled trials still runs the promotions it paid for.
    """
    if reserve and PROMOTED_ATTR in trial.user_attrs:
        return 0.0
    fidelity = trial_fidelity(trial)
    return fidelity + reserve if fidelity < 1.0 else 1.0


class CountTracker:
    """:func:`counted` kept current from the trials that appeared or finished since the last
    update, for a loop that asks before every trial: an update costs the new trials and
    those not finished yet, not the study.

    A trial's retry links (``retry_history``, ``resumes``) are set when it is created, and a
    finished trial's attrs no longer change; a trial that is not finished is looked at again
    on each update.
    """

    def __init__(self, reserve: float = 0.0) -> None:
        self.reserve = reserve  # see weight()
        self._seen = 0  # trials[:_seen] were looked at
        self._pending: set[int] = set()  # of those, the ones not finished then
        self._retried: set[int] = set()
        self._finished: set[int] = set()  # finished trials that are not surplus
        self._finished_counted = 0.0  # of those, the weight of the ones not retried
        self._trials: Sequence[FrozenTrial] = ()

    def update(self, trials: Sequence[FrozenTrial]) -> None:
        """Take in ``trials``: all the study's, in number order, as ``get_trials`` gives
        them."""
        check_numbered(trials)
        looked = [trials[i] for i in sorted(self._pending)] + list(trials[self._seen :])
        self._seen, self._pending, self._trials = len(trials), set(), trials
        for trial in looked:
            for number in retried_numbers([trial]):
                if number not in self._retried:
                    self._retried.add(number)
                    if number in self._finished:
                        self._finished_counted -= self._weight(self._trials[number])
            if not trial.state.is_finished():
                self._pending.add(trial.number)
            elif not trial.user_attrs.get(SURPLUS_ATTR):
                self._finished.add(trial.number)
                if trial.number not in self._retried:
                    self._finished_counted += self._weight(trial)

    def _weight(self, trial: FrozenTrial) -> float:
        return weight(trial, self.reserve)

    def _counts(self, trial: FrozenTrial) -> float:
        counts = trial.number not in self._retried and not trial.user_attrs.get(SURPLUS_ATTR)
        return self._weight(trial) if counts else 0.0

    @property
    def trials(self) -> Sequence[FrozenTrial]:
        """The study's trials at the last update."""
        return self._trials

    def unfinished(self) -> list[FrozenTrial]:
        """The trials not finished at the last update (waiting or running)."""
        return [self._trials[i] for i in sorted(self._pending)]

    def total(self) -> float:
        """The weight (:func:`weight`) of ``counted(trials)`` of the last update: their number
        in a study without fidelity."""
        pending = sum(self._counts(self._trials[i]) for i in self._pending)
        return _exact(self._finished_counted + pending)

    def before(self, number: int) -> float:
        """What the trials numbered below ``number`` count (of the last update)."""
        return _exact(self.total() - sum(self._counts(t) for t in self._trials[number:]))


def _exact(total: float) -> float:
    # Sums of fractions such as 0.3 are off in the last bits: 10 screened trials are 3.0.
    return round(total, 9)


_TRACKERS: weakref.WeakKeyDictionary[optuna.Study, CountTracker] = weakref.WeakKeyDictionary()


def count_tracker(
    study: optuna.Study, trials: Sequence[FrozenTrial] | None = None, reserve: float = 0.0
) -> CountTracker:
    """The :class:`CountTracker` of ``study`` (one per study object), updated now (with
    ``trials``, the study's trials as ``get_trials`` gave them just now, if given).
    ``reserve``: see :func:`weight` (taken when the tracker is made)."""
    tracker = _TRACKERS.get(study)
    if tracker is None:
        tracker = _TRACKERS[study] = CountTracker(reserve)
    tracker.update(study.get_trials(deepcopy=False) if trials is None else trials)
    return tracker
