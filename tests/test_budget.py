"""What counts toward a study's target, kept current after every trial."""

from __future__ import annotations

import random

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from autoprune.run.budget import SURPLUS_ATTR, CountTracker, count_tracker, counted
from autoprune.study.storages import RESUMES_ATTR


def test_the_count_tracker_counts_as_counted() -> None:
    """Trials appear (some retrying or resuming earlier ones, some surplus) and finish in any
    order; after each update the tracker's counts are those of counted()."""
    rng = random.Random(5)
    study = optuna.create_study(directions=["maximize", "minimize"])
    tracker = CountTracker()
    for step in range(150):
        trials = study.get_trials(deepcopy=False)
        unfinished = [t for t in trials if not t.state.is_finished()]
        if unfinished and rng.random() < 0.5:
            finishing = rng.choice(unfinished)
            storage, tid = study._storage, finishing._trial_id
            if finishing.state == TrialState.WAITING:
                storage.set_trial_state_values(tid, TrialState.RUNNING)
            if rng.random() < 0.2:
                storage.set_trial_user_attr(tid, SURPLUS_ATTR, True)
            storage.set_trial_state_values(tid, rng.choice([TrialState.FAIL, TrialState.PRUNED]))
        else:
            study.add_trial(_new_trial(rng, trials))
        trials = study.get_trials(deepcopy=False)
        tracker.update(trials)
        kept = counted(trials)
        assert tracker.total() == len(kept), step
        for number in (0, len(trials) // 2, len(trials)):
            assert tracker.before(number) == sum(t.number < number for t in kept), step
    assert count_tracker(study).total() == len(counted(study.trials))


def _new_trial(rng: random.Random, trials: list[FrozenTrial]) -> FrozenTrial:
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    user: dict[str, object] = {}
    system: dict[str, object] = {}
    if failed and rng.random() < 0.3:
        if rng.random() < 0.5:
            system["retry_history"] = [rng.choice(failed)]
        else:
            user[RESUMES_ATTR] = rng.choice(failed)
    return create_trial(state=TrialState.WAITING, user_attrs=user, system_attrs=system)
