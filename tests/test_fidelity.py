"""Multi-fidelity studies: screened trials, promotions, the front, the budget, races."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import new_study
from optuna.trial import FrozenTrial, TrialState

import autoprune
from autoprune.cli._common import status_text
from autoprune.errors import SpecError, StorageError
from autoprune.pruning.policy import Policy
from autoprune.run.budget import SURPLUS_ATTR, CountTracker, counted
from autoprune.run.status import study_status
from autoprune.run.worker import run_worker
from autoprune.spec import spec_from_dict
from autoprune.study import _optuna
from autoprune.study.fidelity import (
    DUPLICATE,
    FIDELITY_ATTR,
    PROMOTED_ATTR,
    Fidelity,
    duplicate_of,
    enqueue_promotion,
    promotions,
)
from autoprune.study.front import current_front, front_trials
from autoprune.study.objective import screened_task
from autoprune.study.setup import check_same, make_setup, read_setup
from autoprune.study.study import replay
from autoprune.task import Task
from autoprune.train import steps_per_epoch, total_steps

FIDELITY = Fidelity(screen=0.25, promote=0.5)
SPACE = autoprune.SearchSpace(
    criteria=("magnitude", "random"), scopes=("layer",), rules=("ratio",)
)
ONE_WARM_START = autoprune.WarmStart(
    allocations=("lamp",), sparsities=(0.9,), schedules=("oneshot",)
)


def steps_counted(task: Task) -> tuple[Task, list[int]]:
    """``task`` whose optimizer records every step it takes (one entry per trial)."""
    counts: list[int] = []

    def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(params, lr=lr)
        counts.append(0)

        def counting_hook(*_: Any) -> None:
            counts[-1] += 1

        opt.register_step_post_hook(counting_hook)
        return opt

    return dataclasses.replace(task, optimizer=optimizer), counts


def search(task: Task, trials: int = 4, **kwargs: Any) -> optuna.Study:
    kwargs.setdefault("warm_start", ONE_WARM_START)
    return autoprune.search(task, n_trials=trials, space=SPACE, fidelity=FIDELITY, **kwargs)


def by_number(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False)


def test_screened_trials_run_a_fraction_of_the_steps(tiny_task: Task) -> None:
    task, counts = steps_counted(dataclasses.replace(tiny_task, finetune_epochs=2))
    full = total_steps(task)
    study = search(task)
    trials = by_number(study)
    assert len(counts) == len(trials)
    for trial, steps in zip(trials, counts, strict=True):
        level = trial.user_attrs[FIDELITY_ATTR]
        assert steps == (full if level == 1.0 else max(1, int(0.25 * full)))
        assert trial.user_attrs["epochs_spent"] == steps / steps_per_epoch(task)
    assert trials[0].user_attrs["warm_start"] and trials[0].user_attrs[FIDELITY_ATTR] == 1.0
    sampled = [
        t for t in trials if "warm_start" not in t.user_attrs and PROMOTED_ATTR not in t.user_attrs
    ]
    assert sampled and all(t.user_attrs[FIDELITY_ATTR] == 0.25 for t in sampled)


def test_a_screen_of_less_than_one_step_runs_one(tiny_task: Task) -> None:
    task = dataclasses.replace(tiny_task, finetune_steps=3)
    assert total_steps(screened_task(task, 0.25)) == 1
    assert total_steps(screened_task(dataclasses.replace(task, finetune_steps=100), 0.25)) == 25


def test_promotions_repeat_the_screened_policy_at_full_fidelity(tiny_task: Task) -> None:
    study = search(tiny_task, trials=5)
    trials = by_number(study)
    promoted = [t for t in trials if PROMOTED_ATTR in t.user_attrs]
    screened = [
        t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs[FIDELITY_ATTR] < 1
    ]
    assert len(promoted) == int(FIDELITY.promote * len(screened)) >= 1
    for trial in promoted:
        source = trials[trial.user_attrs[PROMOTED_ATTR]]
        assert source.user_attrs[FIDELITY_ATTR] == 0.25
        assert trial.user_attrs[FIDELITY_ATTR] == 1.0
        assert trial.params == source.params
        assert Policy.from_dict(trial.user_attrs["policy"]) == Policy.from_dict(
            source.user_attrs["policy"]
        )
        assert trial.user_attrs["epochs_spent"] == tiny_task.finetune_epochs
    # A promotion goes to the best screened trials by non-dominated rank.
    assert {t.user_attrs[PROMOTED_ATTR] for t in promoted} <= {t.number for t in screened}
    # Both fidelities replay their recorded numbers (the screened one its short fine-tune).
    for trial in (promoted[0], trials[promoted[0].user_attrs[PROMOTED_ATTR]]):
        assert replay(tiny_task, trial).metrics["accuracy"] == trial.values[0]


def test_promotions_rank_by_non_dominated_sorting() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    # (accuracy, size): 0 and 1 are the screened front, 2 is dominated by 1, 3 by everything.
    for values in ((0.9, 100.0), (0.8, 50.0), (0.7, 60.0), (0.5, 200.0)):
        study.add_trial(optuna.create_trial(values=list(values), user_attrs={FIDELITY_ATTR: 0.25}))
    trials = study.get_trials()
    assert promotions(trials, Fidelity(0.25, 0.5), study.directions) == [0, 1]
    assert promotions(trials, Fidelity(0.25, 0.75), study.directions) == [0, 1, 2]
    enqueue_promotion(study, trials[0])
    again = study.get_trials()
    assert promotions(again, Fidelity(0.25, 0.5), study.directions) == [1]
    assert promotions(again, Fidelity(0.25, 0.25), study.directions) == []


def test_the_front_pick_and_status_never_hold_a_screened_trial(tmp_path: Path) -> None:
    study = optuna.create_study(
        directions=["maximize", "minimize"], storage=f"sqlite:///{tmp_path / 's.db'}"
    )
    study.set_metric_names(["accuracy", "nonzero_params"])
    # The screened trial dominates both full ones.
    for values, level in (((0.99, 10.0), 0.25), ((0.9, 100.0), 1.0), ((0.8, 50.0), None)):
        attrs = {"density": values[1] / 1000.0, **({FIDELITY_ATTR: level} if level else {})}
        study.add_trial(optuna.create_trial(values=list(values), user_attrs=attrs))
    assert _optuna.pareto_front(study.get_trials(), study.directions) != []
    assert [t.number for t in front_trials(study)] == [1, 2]
    assert [t.number for t in current_front(study)] == [1, 2]
    assert autoprune.pick(study, min_accuracy=0.5).number == 2
    assert list(autoprune.pareto_front(study)["trial"]) == [2, 1]
    status = study_status(study)
    assert status.front_size == 2
    assert (status.screened, status.full, status.compute) == (1, 2, 2.25)
    assert status.best_at_sparsity[0.9] == (0.9, 1)  # not the screened 0.99
    assert status.progress == 2.25
    assert "fidelity: 1 screened, 2 full; compute 2.25 full trials" in status_text(status)


def test_the_trials_table_says_which_trials_are_screened(tiny_task: Task) -> None:
    from autoprune.report.data import trials_frame

    study = search(tiny_task)
    frame = trials_frame(study)
    screened = frame[frame["fidelity"] < 1]
    assert len(screened) and not screened["on_front"].any()
    plain = autoprune.search(tiny_task, n_trials=2, space=SPACE, warm_start=None)
    assert "fidelity" not in trials_frame(plain)


def test_the_budget_counts_compute_in_full_trials(tiny_task: Task) -> None:
    target = 6
    study = search(tiny_task, trials=target)
    trials = counted(by_number(study))
    spent = sum(t.user_attrs[FIDELITY_ATTR] for t in trials)
    # More trials than the target, at no more compute; the promotions were paid for.
    assert len(trials) > target
    assert target - 1 - FIDELITY.screen < spent <= target
    screened = [t for t in trials if t.user_attrs[FIDELITY_ATTR] < 1]
    assert sum(PROMOTED_ATTR in t.user_attrs for t in trials) == int(0.5 * len(screened))
    assert study_status(study).compute == spent


def test_the_count_tracker_weighs_trials() -> None:
    def trial(number: int, **attrs: Any) -> FrozenTrial:
        made = optuna.create_trial(values=[1.0, 1.0], user_attrs=attrs)
        made.number = number
        return made

    trials = [
        trial(0),
        trial(1, fidelity=0.25),
        trial(2, fidelity=0.25),
        trial(3, fidelity=1.0, promoted_from=1),
    ]
    plain, reserving = CountTracker(), CountTracker(reserve=0.5)
    plain.update(trials)
    reserving.update(trials)
    assert plain.total() == 2.5  # what was spent
    assert reserving.total() == 2.5  # 1 + 2 * (0.25 + 0.5) + 0: the promotion was reserved
    assert reserving.before(3) == 2.5 and plain.before(2) == 1.25
    tens = CountTracker()
    tens.update([trial(i, fidelity=0.3) for i in range(10)])
    assert tens.total() == 3.0


def test_a_crash_keeps_the_queued_promotions(tiny_task: Task, tmp_path: Path) -> None:
    storage, name = f"sqlite:///{tmp_path / 'f.db'}", "crash"

    def crash_once_promoted(study: optuna.Study, trial: FrozenTrial) -> None:
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if any(PROMOTED_ATTR in t.user_attrs for t in waiting):
            raise RuntimeError("the worker crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        search(tiny_task, storage=storage, study_name=name, callbacks=[crash_once_promoted])
    waiting = [
        t
        for t in optuna.load_study(study_name=name, storage=storage).get_trials()
        if t.state == TrialState.WAITING
    ]
    (queued,) = waiting
    study = search(tiny_task, storage=storage, study_name=name)
    ran = by_number(study)[queued.number]
    assert ran.state == TrialState.COMPLETE and ran.user_attrs[FIDELITY_ATTR] == 1.0
    assert ran.user_attrs[PROMOTED_ATTR] == queued.user_attrs[PROMOTED_ATTR]


def test_two_workers_promoting_at_once_run_the_promotion_once(
    tiny_task: Task, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'race.db'}"
    study = new_study(
        tiny_task, storage=storage, study_name="race", trials=2, space=SPACE, fidelity=FIDELITY
    )
    study.sampler = optuna.samplers.RandomSampler(seed=0)
    # Two screened trials, without their promotions (the promoter is the worker's callback).
    objective = autoprune.study.study.objective_for(study, tiny_task)[0]
    study.optimize(objective, n_trials=2)
    # Both workers read the study before either wrote: each enqueues the same promotion.
    snapshot = by_number(study)
    (chosen,) = promotions(snapshot, FIDELITY, study.directions)
    enqueue_promotion(study, snapshot[chosen])
    enqueue_promotion(study, snapshot[chosen])
    run_worker(study, tiny_task, target=2)
    trials = by_number(study)
    copies = [t for t in trials if t.user_attrs.get(PROMOTED_ATTR) == chosen]
    assert [t.state for t in copies] == [TrialState.COMPLETE, TrialState.FAIL]
    assert copies[1].user_attrs[SURPLUS_ATTR] is True
    assert copies[1].user_attrs["fail_reason"].startswith(DUPLICATE)
    assert copies[1] not in counted(trials)
    assert "policy" not in copies[1].user_attrs  # refused before it ran


def test_a_retried_promotion_is_not_a_duplicate() -> None:
    def trial(number: int, state: TrialState, **kw: Any) -> FrozenTrial:
        made = optuna.create_trial(
            state=state, user_attrs={PROMOTED_ATTR: 0, **kw.pop("u", {})}, **kw
        )
        made.number = number
        return made

    first = trial(1, TrialState.FAIL)
    dup = trial(2, TrialState.FAIL, u={"fail_reason": f"{DUPLICATE} of trial 0"})
    retry = trial(3, TrialState.WAITING, system_attrs={"retry_history": [1]})
    assert duplicate_of([first, dup, retry], retry) is None
    late = trial(4, TrialState.WAITING)
    assert duplicate_of([first, dup, retry, late], late) == 1


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"screen": 1.0}, "fidelity screen must be a number in (0, 1), got 1.0"),
        ({"screen": 0}, "fidelity screen must be a number in (0, 1), got 0"),
        ({"promote": 0.0}, "fidelity promote must be a number in (0, 1], got 0.0"),
        ({"promote": "half"}, "fidelity promote must be a number in (0, 1], got 'half'"),
        ({"promote": True}, "fidelity promote must be a number in (0, 1], got True"),
        ({"scren": 0.2}, "unknown fidelity key 'scren' (known: screen, promote)"),
    ],
)
def test_bad_fidelity_is_a_one_line_spec_error(table: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as error:
        spec_from_dict({"fidelity": table})
    assert str(error.value) == f"[fidelity] {expected}"
    assert "\n" not in str(error.value)


def test_a_spec_s_fidelity_reaches_the_setup(tiny_task: Task) -> None:
    spec = spec_from_dict({"fidelity": {"screen": 0.5}})
    assert spec.fidelity == Fidelity(screen=0.5, promote=0.34)
    assert spec_from_dict(spec.to_dict()) == spec
    assert spec.setup(tiny_task).fidelity == spec.fidelity
    with pytest.raises(SpecError, match="fidelity must be a Fidelity or None, got 0.5"):
        make_setup(tiny_task, fidelity=0.5)  # type: ignore[arg-type]


def test_a_worker_with_another_fidelity_is_refused(tiny_task: Task) -> None:
    stored = make_setup(tiny_task, fidelity=FIDELITY)
    check_same(stored, make_setup(tiny_task, fidelity=FIDELITY), "s")
    for other in (None, Fidelity(screen=0.5, promote=0.5)):
        with pytest.raises(StorageError, match="created with fidelity"):
            check_same(stored, make_setup(tiny_task, fidelity=other), "s")
    assert autoprune.StudySetup.from_dict(stored.to_dict()) == stored


def test_a_study_without_fidelity_is_as_before(tiny_task: Task) -> None:
    setup = make_setup(tiny_task)
    assert "fidelity" not in setup.to_dict()  # stored setups of older studies read the same
    assert autoprune.StudySetup.from_dict(setup.to_dict()) == setup
    study = autoprune.search(tiny_task, n_trials=3, space=SPACE, warm_start=ONE_WARM_START)
    trials = by_number(study)
    assert len(trials) == 3 and read_setup(study).fidelity is None
    for trial in trials:
        assert not {FIDELITY_ATTR, "epochs_spent", PROMOTED_ATTR} & set(trial.user_attrs)
    assert study_status(study).compute is None


@pytest.mark.slow
def test_two_worker_processes_run_a_fidelity_study(tmp_path: Path) -> None:
    """``autoprune search --workers 2``: the workers join the stored fidelity, promote from
    each other's screened trials, and run no promotion twice; the compute stays in budget."""
    from test_worker import GATHER, SPEC, run_search, trials_of

    spec = SPEC.format(task="tiny", trials=6) + "\n[fidelity]\nscreen = 0.5\npromote = 0.5\n"
    (tmp_path / "gather").mkdir()
    code, out, err = run_search(
        tmp_path, spec, "--workers", "2", **{GATHER: f"{tmp_path / 'gather'}:2"}
    )
    assert code == 0, out + err
    trials = trials_of(f"sqlite:///{tmp_path / 's.db'}", "s")
    kept = counted(trials)
    complete = [t for t in kept if t.state == TrialState.COMPLETE]
    sources = [t.user_attrs[PROMOTED_ATTR] for t in complete if PROMOTED_ATTR in t.user_attrs]
    screened = [t for t in complete if t.user_attrs[FIDELITY_ATTR] < 1]
    assert sources and len(sources) == len(set(sources)) == int(0.5 * len(screened))
    assert 6 - 1 - 0.5 < sum(t.user_attrs[FIDELITY_ATTR] for t in kept) <= 6
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
