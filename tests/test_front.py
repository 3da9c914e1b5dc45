"""front_trials: Optuna's best_trials, without its copy of every trial."""

from __future__ import annotations

import random

import optuna
from optuna.trial import TrialState, create_trial

from autoprune.study.front import FrontTracker, current_front, front_trials


def numbers(trials: list[optuna.trial.FrozenTrial]) -> list[int]:
    return [t.number for t in trials]


def study_of(values: list[tuple[float, float]], constraints: list[float] | None = None):
    """A study of ``values``, each trial constrained as the objective records it (if given),
    then a failed trial."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    given = iter(zip(values, constraints or [None] * len(values), strict=True))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        value, constraint = next(given)
        if constraint is not None:
            trial.set_constraint("c", constraint)
        return value

    study.optimize(objective, n_trials=len(values))
    study.add_trial(create_trial(state=TrialState.FAIL))
    return study


def test_front_trials_is_best_trials() -> None:
    # Duplicates (both on the front), a dominated point, a failed trial.
    values = [(0.9, 100.0), (0.95, 200.0), (0.9, 100.0), (0.8, 150.0), (0.5, 10.0)]
    study = study_of(values)
    assert numbers(front_trials(study)) == numbers(study.best_trials) == [0, 1, 2, 4]
    assert front_trials(optuna.create_study(directions=["maximize", "minimize"])) == []


def test_front_trials_leaves_infeasible_trials_out() -> None:
    # Trial 1 would dominate trial 0 but violates its constraint.
    study = study_of([(0.9, 100.0), (0.95, 50.0), (0.5, 10.0)], constraints=[0.0, 1.0, -1.0])
    assert numbers(front_trials(study)) == numbers(study.best_trials) == [0, 2]


def test_front_trials_are_not_copies() -> None:
    study = study_of([(0.9, 100.0), (0.5, 10.0)])
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert all(t is stored[t.number] for t in front_trials(study))


def test_the_tracked_front_is_the_front_of_every_trial_so_far() -> None:
    """Trials finish out of order, some infeasible, some equal; after each update the tracked
    front is Optuna's front of all the trials so far, and only new trials were looked at."""
    rng = random.Random(3)
    study = optuna.create_study(directions=["maximize", "minimize"])
    tracker = FrontTracker()
    running: list[optuna.Trial] = []
    for step in range(120):
        if running and rng.random() < 0.5:
            trial = running.pop(rng.randrange(len(running)))
            value = (rng.choice([0.5, 0.7, 0.9]), float(rng.choice([10, 20, 30])))
            if rng.random() < 0.2:
                trial.set_constraint("c", rng.uniform(-1, 1))
            if rng.random() < 0.9:
                study.tell(trial, value)
            else:
                study.tell(trial, state=TrialState.FAIL)
        else:
            running.append(study.ask())
        trials = study.get_trials(deepcopy=False)
        new = tracker.update(study, trials)
        assert numbers(tracker.front) == numbers(study.best_trials), step
        assert all(t.state.is_finished() for t in new)
    assert numbers(current_front(study)) == numbers(study.best_trials)
