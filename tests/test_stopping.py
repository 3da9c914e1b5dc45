"""Early stop: the front's accuracy at a size, and trials that stop themselves (PRUNED)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from conftest import new_study
from optuna.trial import TrialState, create_trial

from autoprune import SearchSpace, SpecError, Task
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
    trials = study.trials[1:]
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


@pytest.mark.parametrize("margin", [-0.1, "0.1", True, float("inf"), float("nan"), 1, 5, 1e300])
def test_bad_margins_are_named(margin: object) -> None:
    """Accuracy is a fraction: a margin of 1 or more would stop no trial (5 meant 5 %?)."""
    with pytest.raises(SpecError) as info:
        EarlyStop(margin=margin)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("early_stop margin must be a number in [0, 1) ")
    assert message.endswith(f", got {margin!r}") and "\n" not in message


@pytest.mark.parametrize("margin", [0, 0.0, 0.1, 0.999])
def test_margins_in_range_are_kept(margin: float) -> None:
    assert EarlyStop(margin=margin).margin == margin


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
    for margin in (-1, 5):
        with pytest.raises(SpecError, match=r"^\[early_stop\] early_stop margin must be a number"):
            spec_from_dict({"early_stop": {"margin": margin}})
