"""Front-trial weights: uploads only on the front, removal off it (the file format: test_codec)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from torch import nn

from autoprune import Task, search
from autoprune.errors import SpecError, StorageError
from autoprune.pruning.policy import Policy
from autoprune.spec import spec_from_dict
from autoprune.study.artifacts import (
    ARTIFACT_ID_ATTR,
    ARTIFACTS_ATTR,
    ArtifactSpec,
    FrontWeights,
    dominated,
    resolve_dir,
)
from autoprune.train import evaluate
from autoprune.trial import PruneResult


def test_artifact_spec_and_directories(tmp_path: Path) -> None:
    db = tmp_path / "runs" / "my.db"
    assert resolve_dir(f"sqlite:///{db}", ArtifactSpec()) == tmp_path / "runs" / "my.artifacts"
    assert resolve_dir(f"sqlite:///{db}", ArtifactSpec(dir=str(tmp_path / "w"))) == tmp_path / "w"
    assert resolve_dir(f"sqlite:///{db}", ArtifactSpec(keep="none")) is None
    assert resolve_dir(None, ArtifactSpec()) is None  # in memory
    assert resolve_dir(f"journal:{tmp_path / 'j.log'}", ArtifactSpec()) == tmp_path / "j.artifacts"
    assert resolve_dir("postgresql://u:secret@h/db", ArtifactSpec()) is None  # no "next to it"
    assert resolve_dir("postgresql://h/db", ArtifactSpec(dir="w")) == Path("w").resolve()
    with pytest.raises(SpecError, match="keep must be one of front, all, none, got 'some'"):
        ArtifactSpec(keep="some")
    spec = spec_from_dict({"artifacts": {"dir": "x", "keep": "all"}})
    assert spec.artifacts == ArtifactSpec(dir="x", keep="all")
    assert ArtifactSpec.from_dict(spec.artifacts.to_dict()) == spec.artifacts
    with pytest.raises(SpecError, match=r"\[artifacts\] unknown key 'path'"):
        spec_from_dict({"artifacts": {"path": "x"}})


@pytest.mark.slow
def test_search_keeps_exactly_the_front_weights(tiny_task: Task, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'run.db'}"
    study = search(tiny_task, n_trials=6, storage=storage, study_name="s", seed=2)
    directory = tmp_path / "run.artifacts"
    assert study.user_attrs[ARTIFACTS_ATTR] == {"dir": str(directory), "keep": "front"}
    front = {t.number for t in study.best_trials}
    on_disk = {p.name for p in directory.iterdir()}
    assert on_disk == {study.trials[n].user_attrs[ARTIFACT_ID_ATTR] for n in front}
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    for trial in complete:  # no upload means: dominated when it finished
        if ARTIFACT_ID_ATTR not in trial.user_attrs:
            earlier = [t for t in complete if t.datetime_complete < trial.datetime_complete]
            assert any(_dominates(t.values, trial.values) for t in earlier), trial.number
    # The stored weights are the trial's model: they give its recorded accuracies exactly.
    weights = FrontWeights.find(study)
    assert weights is not None
    for number in front:
        model = copy.deepcopy(tiny_task.model)
        model.load_state_dict(weights.load(study.trials[number]))
        assert evaluate(model, tiny_task, "val")[0] == study.trials[number].values[0]
        assert (
            evaluate(model, tiny_task, "test")[0]
            == study.trials[number].user_attrs["test_accuracy"]
        )


def _dominates(a: list[float], b: list[float]) -> bool:
    return a[0] >= b[0] and a[1] <= b[1] and list(a) != list(b)


def scripted_study(tmp_path: Path, values: list[tuple[float, float]], keep: str) -> optuna.Study:
    """Trials with the given values whose objective uploads a small model, as search does."""
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'x.db'}", directions=["maximize", "minimize"]
    )
    weights = FrontWeights(tmp_path / "store", keep=keep)
    model = nn.Linear(3, 2)
    result = PruneResult(model, Policy({"": 0.5}), {}, {}, {}, {})

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        accuracy, size = values[trial.number]
        weights.upload(trial, result, (accuracy, size))
        return accuracy, size

    study.optimize(objective, n_trials=len(values), callbacks=[weights])
    return study


def test_weights_of_trials_that_leave_the_front_are_removed(tmp_path: Path) -> None:
    values = [(0.5, 100.0), (0.6, 90.0), (0.4, 200.0), (0.7, 300.0), (0.7, 300.0)]
    study = scripted_study(tmp_path, values, keep="front")
    uploaded = [t.number for t in study.trials if ARTIFACT_ID_ATTR in t.user_attrs]
    assert uploaded == [0, 1, 3, 4]  # trial 2 was dominated by trial 1: it cost nothing
    files = {p.name for p in (tmp_path / "store").iterdir()}
    assert files == {study.trials[n].user_attrs[ARTIFACT_ID_ATTR] for n in (1, 3, 4)}
    assert dominated(study, (0.5, 100.0)) and not dominated(study, (0.7, 300.0))


def test_keep_all_keeps_every_upload(tmp_path: Path) -> None:
    study = scripted_study(tmp_path, [(0.5, 100.0), (0.6, 90.0)], keep="all")
    assert len(list((tmp_path / "store").iterdir())) == 2
    weights = FrontWeights.find(study, tmp_path / "store")
    assert weights is not None
    assert weights.load(study.trials[0])["weight"].shape == (2, 3)
    assert weights.has(study.trials[0])
    next((tmp_path / "store").iterdir()).unlink()
    assert [weights.has(t) for t in study.trials].count(False) == 1
    with pytest.raises(StorageError, match="does not exist"):
        FrontWeights.find(study, tmp_path / "nowhere")


@pytest.mark.parametrize(
    "constraints",
    [
        lambda c: {"constraints": [c]},  # Optuna's old list
        lambda c: {"constraints:max_params": c},  # what trial.set_constraint stores
    ],
    ids=["list", "set_constraint"],
)
def test_infeasible_trials_dominate_nothing(constraints: Callable[[float], dict]) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    infeasible = optuna.trial.create_trial(values=[0.9, 10.0], system_attrs=constraints(1.0))
    study.add_trial(infeasible)
    assert study.best_trials == []  # Optuna's front leaves it out, and so does the upload rule
    assert not dominated(study, (0.5, 100.0))
    study.add_trial(optuna.trial.create_trial(values=[0.9, 10.0], system_attrs=constraints(0.0)))
    assert dominated(study, (0.5, 100.0))


def test_a_failed_upload_does_not_stop_the_search(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    weights = FrontWeights(tmp_path / "store")
    weights.directory.rmdir()  # the store's directory vanished: every write fails
    result = PruneResult(nn.Linear(3, 2), Policy({"": 0.5}), {}, {}, {}, {})

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        weights.upload(trial, result, (0.5, 1.0))
        return 0.5, 1.0

    study.optimize(objective, n_trials=1, callbacks=[weights])
    assert study.trials[0].state == TrialState.COMPLETE
    assert ARTIFACT_ID_ATTR not in study.trials[0].user_attrs
    assert "could not store the weights of trial 0" in caplog.text


def test_a_trial_with_a_nan_objective_fails_and_stores_no_weights(
    tiny_task: Task, tmp_path: Path
) -> None:
    """Optuna fails a trial whose value is NaN; its weights must not be left behind."""
    task = dataclasses.replace(tiny_task, metric=lambda logits, targets: math.nan)
    storage = f"sqlite:///{tmp_path / 'nan.db'}"
    study = search(task, n_trials=2, storage=storage, study_name="s", warm_start=None)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    for trial in study.trials:
        assert trial.user_attrs["fail_reason"] == "objective accuracy is nan, not a finite number"
        assert ARTIFACT_ID_ATTR not in trial.user_attrs
    directory = tmp_path / "nan.artifacts"
    assert not directory.exists() or not any(directory.iterdir())
