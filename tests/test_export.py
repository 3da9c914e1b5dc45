"""pick / export / load: rules over Optuna's front, exports that reload to the same numbers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
from test_cli import run
from test_report import VALUES, hand_made_trial
from torch import nn

import autoprune
from autoprune import Task, search
from autoprune.deploy.directory import (
    FILES,
    TASK_REF_ATTR,
    default_task_ref,
    export,
    load,
    macs,
    record_task_ref,
)
from autoprune.errors import SpecError, TaskError
from autoprune.study.artifacts import ARTIFACT_ID_ATTR, load_weights
from autoprune.study.pick import pick
from autoprune.train import evaluate

REF = "conftest:make_task"  # tests/ is on sys.path: this rebuilds the tiny task


@pytest.fixture
def hand_made() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["accuracy", "nonzero_params"])
    for i, (accuracy, nonzero) in enumerate(VALUES):
        study.add_trial(hand_made_trial(accuracy, nonzero, i))
    return study


def test_pick_rules(hand_made: optuna.Study) -> None:
    # Front: 5 and 6 (0.50, 10), 0 (0.90, 100), 1 (0.95, 200), 3 (0.99, 400).
    assert pick(hand_made, min_accuracy=0.95).number == 1
    assert pick(hand_made, min_accuracy=0.91).number == 1
    assert pick(hand_made, min_accuracy=0.0).number == 5  # equal values: the lower number
    assert pick(hand_made, max_params=399).number == 1
    assert pick(hand_made, max_params=400).number == 3
    assert pick(hand_made, max_size=100, by="nonzero_params").number == 0
    # Normalised (log10 size, accuracy): 0 at (0.63, 0.82) is farthest above the chord.
    assert pick(hand_made, knee=True).number == 0
    # The pick is the user's to change: a copy, not the storage's own trial.
    picked = pick(hand_made, knee=True)
    picked.user_attrs["note"] = "mine"
    assert "note" not in hand_made.get_trials(deepcopy=False)[0].user_attrs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_accuracy": 0.995}, "val accuracy >= 0.995 (the best has 0.9900)"),
        ({"max_params": 5}, "no front trial has nonzero_params <= 5 (the smallest has 10)"),
        ({}, "give exactly one of min_accuracy, max_params, max_size, knee, got 0"),
        ({"knee": True, "max_params": 5}, "got ['max_params', 'knee']"),
        ({"knee": True, "by": "bytes"}, "must be one of nonzero_params, got 'bytes'"),
    ],
)
def test_pick_errors(hand_made: optuna.Study, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as error:
        pick(hand_made, **kwargs)
    assert message in str(error.value)


def test_knee_without_a_bend_is_the_nearest_to_ideal() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, (accuracy, size) in enumerate([(0.1, 10), (0.5, 100), (0.95, 1000)]):
        study.add_trial(hand_made_trial(accuracy, size, i))
    assert pick(study, knee=True).number == 1  # every point lies on or below the chord


@pytest.fixture(scope="module")
def searched(_trained_task: Task, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("export")
    storage = f"sqlite:///{directory / 'run.db'}"
    study = search(_trained_task, n_trials=5, storage=storage, study_name="s", seed=4)
    return {"dir": directory, "storage": storage, "study": study, "task": _trained_task}


@pytest.mark.slow
def test_export_and_load_reproduce_the_trial(searched: dict[str, Any], tmp_path: Path) -> None:
    study, task = searched["study"], searched["task"]
    trial = pick(study, knee=True)
    done = export(study, trial.number, tmp_path / "out", task=task, task_ref=REF)
    assert done.source == "artifact"
    assert sorted(p.name for p in done.directory.iterdir()) == sorted(FILES)
    metrics = json.loads((done.directory / "metrics.json").read_text())
    assert metrics["accuracy"] == trial.values[0]
    assert metrics["test_accuracy"] == trial.user_attrs["test_accuracy"]
    assert metrics["nonzero_params"] == trial.values[1]
    assert metrics["bytes"] == (done.directory / "model.pt").stat().st_size
    assert metrics["bytes"] < metrics["dense_bytes"]
    assert metrics["macs"] == macs(task.model, task.val[0][:1]) > 0
    assert json.loads((done.directory / "policy.json").read_text()) == trial.user_attrs["policy"]
    manifest = json.loads((done.directory / "export.json").read_text())
    assert manifest["task"] == REF and manifest["trial"] == trial.number
    # Rebuilt from the task reference alone, the model gives the recorded test accuracy.
    model = autoprune.load(done.directory)
    assert evaluate(model, task, "test")[0] == metrics["test_accuracy"]
    assert not model.training
    state = load_weights(done.directory / "model.pt")
    assert all(state[k].equal(v) for k, v in model.state_dict().items())
    other = Task(model=nn.Linear(3, 2), train=task.train, val=task.val)
    with pytest.raises(TaskError, match="do not fit the model of the given task: Error"):
        load(done.directory, task=other)


@pytest.mark.slow
def test_export_without_weights_replays(
    searched: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study, task = searched["study"], searched["task"]
    trial = pick(study, max_params=float("inf"))  # the most accurate front trial
    copy = tmp_path / "study.artifacts"
    shutil.copytree(searched["dir"] / "run.artifacts", copy)
    (copy / trial.user_attrs[ARTIFACT_ID_ATTR]).unlink()
    with caplog.at_level(logging.WARNING):
        done = export(study, trial.number, tmp_path / "out", task=task, artifact_dir=copy)
    assert done.source == "replay"
    assert f"trial {trial.number} has no stored weights: replaying it" in caplog.text
    assert done.metrics["accuracy"] == trial.values[0]
    model = load(done.directory, task=task)
    assert evaluate(model, task, "test")[0] == trial.user_attrs["test_accuracy"]


@pytest.mark.slow
def test_export_refuses_bad_input(searched: dict[str, Any], tmp_path: Path) -> None:
    study, task = searched["study"], searched["task"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SpecError, match="'.*full' exists and is not empty"):
        export(study, 0, tmp_path / "full", task=task)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    with pytest.raises(SpecError, match="study 's' has no trial 99"):
        export(study, 99, tmp_path / "x", task=task)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_pick_and_export(searched: dict[str, Any], tmp_path: Path, capsys) -> None:
    study, storage = searched["study"], searched["storage"]
    code, out, _ = run(capsys, "pick", "--knee", "--storage", storage)
    knee = pick(study, knee=True)
    assert code == 0 and out.startswith(f"trial {knee.number}: accuracy ")
    assert "weights stored" in out
    code, _, err = run(capsys, "pick", "--min-accuracy", "1.5", "--storage", storage)
    assert code == 2 and err.count("\n") == 1
    assert "autoprune: error: no front trial has val accuracy >= 1.5" in err
    out_dir = tmp_path / "model"
    argv = ["export", str(knee.number), "--out", str(out_dir), "--task", REF]
    code, out, _ = run(capsys, *argv, "--storage", storage)
    assert code == 0 and f"exported trial {knee.number} from its stored weights" in out
    assert (out_dir / "model.pt").exists()
    code, _, err = run(capsys, "export", "0", "--out", str(tmp_path / "m2"), "--storage", storage)
    assert code == 2 and err.startswith("autoprune: error: unknown task 'tiny'")
    assert not (tmp_path / "m2").exists()


@pytest.mark.slow
def test_a_recorded_task_reference_is_the_default(searched: dict[str, Any]) -> None:
    study = searched["study"]
    assert default_task_ref(study) == "tiny"  # the task's name
    record_task_ref(study, REF)
    try:
        assert default_task_ref(study) == REF
    finally:
        study.set_user_attr(TASK_REF_ATTR, None)
