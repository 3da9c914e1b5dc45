"""Constraints: validated bounds, their values, and feasible fronts."""

from __future__ import annotations

import pytest

from autoprune import SearchSpace, SpecError, Task, search
from autoprune.spec import StudySpec, spec_from_dict
from autoprune.study.constraints import Constraints


def test_violations_are_positive_when_a_bound_is_missed() -> None:
    metrics = {"accuracy": 0.9, "density": 0.25, "nonzero_params": 500.0}
    assert Constraints().violations(metrics) == {}
    values = Constraints(min_accuracy=0.95, max_density=0.3, max_params=400).violations(metrics)
    assert values == pytest.approx({"min_accuracy": 0.05, "max_density": -0.05, "max_params": 100})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_density": 0}, "constraint max_density must be a number in (0, 1], got 0"),
        ({"max_density": 1.5}, "constraint max_density must be a number in (0, 1], got 1.5"),
        ({"max_params": 10.5}, "constraint max_params must be an integer >= 0, got 10.5"),
        ({"min_accuracy": "0.9"}, "constraint min_accuracy must be a number in [0, 1], got '0.9'"),
        ({"min_accuracy": True}, "constraint min_accuracy must be a number in [0, 1], got True"),
        ({"min_accuracy": 2}, "constraint min_accuracy must be a number in [0, 1], got 2"),
        ({"min_accuracy": -0.1}, "constraint min_accuracy must be a number in [0, 1], got -0.1"),
        ({"min_accuracy": float("nan")}, "constraint min_accuracy must be a number in [0, 1]"),
        ({"max_size": 3}, "unknown constraint 'max_size' (known: min_accuracy, max_density, "),
    ],
)
def test_bad_constraints_are_named(data: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        Constraints.from_dict(data)
    assert str(info.value).startswith(message)


def test_round_trip() -> None:
    c = Constraints(min_accuracy=0.5, max_params=10)
    assert Constraints.from_dict(c.to_dict()) == c


def test_the_front_holds_only_feasible_trials(tiny_task: Task) -> None:
    space = SearchSpace(
        criteria=["magnitude"],
        scopes=["global"],
        rules=["ratio"],
        parametrization="per-layer",
        schedules=["oneshot"],
    )
    constraints = Constraints(max_density=0.5, min_accuracy=0.0)
    study = search(
        tiny_task, n_trials=6, seed=0, space=space, constraints=constraints, warm_start=None
    )
    for trial in study.trials:
        assert set(trial.constraints) == {"max_density", "min_accuracy"}
        assert trial.constraints["max_density"] == pytest.approx(trial.user_attrs["density"] - 0.5)
    feasible = [t for t in study.trials if t.user_attrs["density"] <= 0.5]
    assert 0 < len(feasible) < 6  # the seed draws both kinds
    assert study.best_trials and all(t in feasible for t in study.best_trials)


def test_spec_reads_constraints() -> None:
    spec = spec_from_dict({"constraints": {"min_accuracy": 0.9, "max_params": 5000}})
    assert spec.constraints == Constraints(min_accuracy=0.9, max_params=5000)
    assert StudySpec().constraints == Constraints()  # none by default
    with pytest.raises(SpecError, match=r"^\[constraints\] unknown constraint 'max_size'"):
        spec_from_dict({"constraints": {"max_size": 1}})
