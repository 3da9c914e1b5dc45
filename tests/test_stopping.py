"""Early stop: the front's accuracy at a size, and trials that stop themselves (PRUNED)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from conftest import new_study
from optuna.trial import TrialState, create_trial

from autoprune import SearchSpace, SpecError, Task, make_setup
from autoprune.cli._common import print_counts
from autoprune.run.worker import run_worker
from autoprune.spec import StudySpec, spec_from_dict
from autoprune.study.objective import DIRECTIONS
from autoprune.study.stopping import EarlyStop, front_accuracy


def _trial(accuracy: float, nonzero: float, density: float) -> optuna.trial.FrozenTrial:
    return create_trial(values=[accuracy, nonzero], user_attrs={"density": density})


def test_front_accuracy_is_the_best_at_that_density_or_lower() -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    assert front_accuracy(study, 0.5) is None  # no front yet
    for accuracy, density in ((0.99, 0.8), (0.95, 0.3), (0.7, 0.05)):
        study.add_trial(_trial(accuracy, 1000 * density, density))
    assert front_accuracy(study, 1.0) == 0.99
    assert front_accuracy(study, 0.5) == 0.95
    assert front_accuracy(study, 0.3) == 0.95
    assert front_accuracy(study, 0.1) == 0.7
    assert front_accuracy(study, 0.01) is None


def _study_with_front(
    task: Task, tmp_path: Path, accuracy: float, early_stop: EarlyStop
) -> optuna.Study:
    space = SearchSpace(criteria=["magnitude"], sparsity=(0.3, 0.6))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = new_study(task, space=space, storage=storage, study_name="s", early_stop=early_stop)
    study.add_trial(_trial(accuracy, 0.0, 0.0))  # a model with no weight at that accuracy
    return study


@pytest.mark.parametrize(("front", "stopped"), [(2.0, True), (0.0, False)])
def test_a_trial_far_below_the_front_stops_after_one_epoch(
    tiny_task: Task,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    front: float,
    stopped: bool,
) -> None:
    task = dataclasses.replace(tiny_task, finetune_epochs=3)
    study = _study_with_front(task, tmp_path, front, EarlyStop(margin=0.5))
    run_worker(study, task, target=3)  # the hand-made front trial, then two
    # Read afresh: the study that ran them keeps finished trials without their policy.
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}").trials[1:]
    expected = TrialState.PRUNED if stopped else TrialState.COMPLETE
    assert [t.state for t in trials] == [expected] * 2
    for t in trials:
        assert "policy" in t.user_attrs  # a stopped trial still says what it tried
        assert ("stopped_at" in t.user_attrs) is stopped
        if stopped:
            epoch, accuracy, best = t.user_attrs["stopped_at"]
            assert epoch == 1 and best == front and accuracy < front - 0.5
    print_counts(study)
    assert ("2 stopped early" in capsys.readouterr().out) is stopped


def test_without_early_stop_nothing_stops(tiny_task: Task, tmp_path: Path) -> None:
    study = _study_with_front(tiny_task, tmp_path, 2.0, EarlyStop(margin=None))
    run_worker(study, tiny_task, target=2)
    assert study.trials[-1].state == TrialState.COMPLETE


@pytest.mark.parametrize("margin", [-0.1, "0.1", True, float("inf"), float("nan")])
def test_bad_margins_are_named(margin: object) -> None:
    with pytest.raises(SpecError) as info:
        EarlyStop(margin=margin)  # type: ignore[arg-type]
    assert str(info.value) == f"early_stop margin must be a finite number >= 0, got {margin!r}"


@pytest.mark.parametrize("margin", [1, 1.0, 5, 1e300])
def test_a_margin_of_1_or_more_is_refused_on_accuracy(tiny_task: Task, margin: float) -> None:
    """Accuracy is a fraction: a margin of 1 or more would stop no trial (5 meant 5 %?)."""
    with pytest.raises(SpecError) as info:
        make_setup(tiny_task, early_stop=EarlyStop(margin=margin))
    assert str(info.value) == (
        "early_stop margin must be < 1 for a task scored by accuracy (a fraction: a margin of "
        f"1 or more stops no trial; early_stop = false turns it off), got {margin!r}"
    )
    spec = spec_from_dict({"task": "digits-cnn", "early_stop": {"margin": margin}})
    with pytest.raises(SpecError, match="^early_stop margin must be < 1 for a task scored by"):
        spec.setup(tiny_task)


@pytest.mark.parametrize("margin", [0, 0.0, 0.1, 0.999])
def test_margins_below_1_are_kept(tiny_task: Task, margin: float) -> None:
    setup = make_setup(tiny_task, early_stop=EarlyStop(margin=margin))
    assert setup.early_stop == EarlyStop(margin=margin)


def test_a_score_of_the_task_s_own_takes_a_margin_in_its_own_units(tiny_task: Task) -> None:
    """Perplexity, say: 5 points below the front is a margin that means something."""
    perplexity = dataclasses.replace(
        tiny_task, evaluate=lambda model, batches: 20.0, higher_is_better=False
    )
    by_metric = dataclasses.replace(tiny_task, metric=lambda logits, targets: 0.0)
    for task in (perplexity, by_metric):
        assert make_setup(task, early_stop=EarlyStop(margin=5)).early_stop == EarlyStop(5)


def test_early_stop_round_trips_and_rejects_unknown_keys() -> None:
    assert EarlyStop.from_dict(EarlyStop(margin=0.2).to_dict()) == EarlyStop(margin=0.2)
    with pytest.raises(SpecError, match="^unknown early-stop key 'patience' "):
        EarlyStop.from_dict({"patience": 1})


def test_spec_turns_early_stop_on_off_or_sets_its_margin() -> None:
    assert StudySpec().early_stop == EarlyStop(margin=None)  # off by default
    assert spec_from_dict({"early_stop": False}).early_stop == EarlyStop(margin=None)
    assert spec_from_dict({"early_stop": True}).early_stop == EarlyStop()
    assert spec_from_dict({"early_stop": {"margin": 0.2}}).early_stop == EarlyStop(margin=0.2)
    with pytest.raises(
        SpecError, match="^key 'early_stop' must be true, false or a table, got 1$"
    ):
        spec_from_dict({"early_stop": 1})
    with pytest.raises(SpecError, match=r"^\[early_stop\] early_stop margin must be a finite"):
        spec_from_dict({"early_stop": {"margin": -1}})
