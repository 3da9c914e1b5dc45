"""The study's Pareto front as Optuna computes it, read without copying every trial.

``study.best_trials`` deep-copies every trial of the study before it picks the front: about
0.1 s a call at 1,000 trials. Code that asks for the front after each trial (the front-table
and front-weights callbacks, early stopping) or several times per page (the dashboard) uses
:func:`front_trials` instead: the same trials, from Optuna's own function, uncopied.
"""

from __future__ import annotations

import optuna
from optuna.study import _constrained_optimization, _multi_objective
from optuna.trial import FrozenTrial

# How Optuna computes best_trials (private: a rename fails loudly at import, and the tests
# compare front_trials with study.best_trials).
_is_constrained = _constrained_optimization._is_constrained_optimization
_pareto_front = _multi_objective._get_pareto_front_trials_by_trials


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """``study.best_trials`` (the feasible front when trials have constraints), in trial order,
    without Optuna's deep copy. The trials are the storage's own: read them, never change them.
    """
    trials = study.get_trials(deepcopy=False)
    return _pareto_front(trials, study.directions, consider_constraint=_is_constrained(trials))


def score_sign(study: optuna.Study) -> float:
    """1.0 when the study's accuracy objective is maximised, -1.0 when a lower score is better
    (a task with ``higher_is_better=False``): ``sign * accuracy`` is always "more is better"."""
    return 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
