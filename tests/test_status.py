"""Study status: counts, pace, front, hypervolume, workers and stuck trials, from storage."""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import optuna
import pytest
from conftest import new_study

from autoprune.cli import main
from autoprune.run.status import hypervolume, study_status
from autoprune.run.worker import run_worker, worker_id
from autoprune.study.setup import read_setup
from autoprune.study.space import SearchSpace
from autoprune.task import Task

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, _trained_task: Task) -> str:
    """Four complete trials of the tiny task and one left running, with a target of 6."""
    url = f"sqlite:///{tmp_path_factory.mktemp('status') / 's.db'}"
    task = dataclasses.replace(_trained_task, model=copy.deepcopy(_trained_task.model))
    study = new_study(task, space=SearchSpace(), storage=url, study_name="s", trials=6)
    run_worker(study, task, target=4)
    study.ask()  # running, with no worker recorded
    return url


@pytest.fixture
def study(db: str) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=db)


def test_status_counts_the_study(study: optuna.Study) -> None:
    status = study_status(study)
    assert status.name == "s" and status.target == 6
    assert status.states == {
        "complete": 4,
        "failed": 0,
        "stopped": 0,
        "running": 1,
        "waiting": 0,
    }
    assert (status.counted, status.done) == (5, 4)
    assert status.front_size == len(study.best_trials) >= 1
    assert status.hypervolume is not None and 0.0 < status.hypervolume <= 1.0
    assert status.trials_per_hour is not None and status.trials_per_hour > 0
    (seen,) = status.workers
    assert (seen.worker, seen.trials, seen.running) == (worker_id(), 4, 0)
    assert status.long_running == []


def test_best_accuracy_at_sparsity_levels(study: optuna.Study) -> None:
    status = study_status(study)
    complete = [t for t in study.trials if t.values is not None]
    for level, best in status.best_at_sparsity.items():
        fits = [t for t in complete if 1 - t.user_attrs["density"] >= level]
        if not fits:
            assert best is None
        else:
            assert best is not None and best[0] == max(t.values[0] for t in fits)
            assert 1 - study.trials[best[1]].user_attrs["density"] >= level


def test_long_running_trials_and_old_workers(study: optuna.Study) -> None:
    later = time.time() + 3600
    status = study_status(study, now=later, recent=60)
    ((number, worker, seconds),) = status.long_running
    assert (number, worker) == (4, "?") and seconds > 3500
    assert status.workers == []  # last seen an hour ago
    assert status.trials_per_hour is None  # nothing finished in the last hour


def test_hypervolume_of_a_known_front(study: optuna.Study) -> None:
    dense = read_setup(study).dense["nonzero_params"]
    front = study.best_trials
    points = [(t.values[0], t.values[1] / dense) for t in front]
    assert hypervolume(study, front) == pytest.approx(_area(points))
    assert hypervolume(study, []) is None


def _area(points: list[tuple[float, float]]) -> float:
    """Area of the union of boxes [size, 1] x [0, accuracy]."""
    xs = sorted({size for _, size in points} | {1.0})
    area = 0.0
    for left, right in zip(xs, xs[1:], strict=False):
        height = max((acc for acc, size in points if size <= left), default=0.0)
        area += (right - left) * height
    return float(np.float64(area))


def test_status_command(study: optuna.Study, db: str, capsys) -> None:
    code = main(["status", "--storage", db])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("study 's': 5 trials of a target of 6 (4 complete, 0 failed, ")
    assert "trials/hour over the last hour" in out
    assert f"Pareto front: {len(study.best_trials)} trials, hypervolume 0." in out
    assert "best val accuracy at sparsity >= 50%: " in out
    assert f"  {worker_id()}: 4 trials, 0 running, last seen " in out
