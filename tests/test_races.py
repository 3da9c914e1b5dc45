"""Searches that race in real processes: two create one study at once.

Each search runs in its own process through a small driver that gathers the two at a file
barrier once both have found no study (where they measure the dense model, just before
creating it), so that both create it at once on every run: they wait on files, not sleeps.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from test_worker import PG_URL, SPEC, env, pg_available

from autoprune.study.setup import read_setup
from autoprune.study.storages import open_storage

# Bounds on waits are failure limits only, generous for a loaded machine.
# Runs `autoprune ARGS...` after gathering with the other searches in $RACE_BARRIER (N files).
DRIVER = """\
import os, sys, time
from pathlib import Path

import autoprune.study.study as study_module
from autoprune.cli import main

barrier, expected = os.environ["RACE_BARRIER"].rsplit(":", 1)
measure = study_module.dense_metrics


def gathered(task, setup):
    Path(barrier, str(os.getpid())).touch()
    deadline = time.monotonic() + 600
    while len(os.listdir(barrier)) < int(expected):
        if time.monotonic() > deadline:
            raise SystemExit("the other searches never came")
        time.sleep(0.01)
    return measure(task, setup)


study_module.dense_metrics = gathered
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(URL, study name) on each kind of storage, its tables made but no study in it."""
    name = f"race-{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'r.db'}"
        # Optuna's tables, as after an earlier study
        open_storage(url, for_writing=True, heartbeat=None).engine.dispose()
        yield url, name
    elif request.param == "journal":
        yield f"journal:{tmp_path / 'r.log'}", name
    else:
        if not pg_available():
            pytest.skip("no PostgreSQL answers `pg_isready -h 127.0.0.1`")
        try:
            yield PG_URL, name
        finally:
            if name in optuna.get_all_study_names(PG_URL):
                optuna.delete_study(study_name=name, storage=PG_URL)


def race(tmp_path: Path, url: str, name: str, epochs: list[int]) -> list[tuple[int, str]]:
    """Run one search per entry of ``epochs`` (its fine-tuning epochs), all creating study
    ``name`` at once; their exit codes and stderr."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = []
    for i, n in enumerate(epochs):
        spec = SPEC.format(task="tiny", trials=4).replace("epochs = 1", f"epochs = {n}")
        spec = f'storage = "{url}"\nstudy_name = "{name}"\n' + spec
        (tmp_path / f"{i}.toml").write_text(spec, encoding="utf-8")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", DRIVER, "search", f"{i}.toml", "-q"],
                cwd=tmp_path,
                env=env(RACE_BARRIER=f"{barrier}:{len(epochs)}"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        results.append((proc.returncode, err))
    return results


@pytest.mark.slow
def test_two_searches_creating_one_study_with_different_recipes(
    storage: tuple[str, str], tmp_path: Path
) -> None:
    """One creates the study and searches it; the other is refused, as on a resume with a
    different recipe, and runs nothing."""
    url, name = storage
    results = race(tmp_path, url, name, [1, 2])
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (winner,) = [i for i, (code, _) in enumerate(results) if code == 0]
    (err,) = [err for code, err in results if code == 2]
    assert err.strip().count("\n") == 0, err
    assert err.startswith("autoprune: error: study ") and "created with finetune" in err, err
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    assert read_setup(study).finetune.epochs == [1, 2][winner]
    assert len(study.trials) == 4  # the winner's budget; the refused search ran none


@pytest.mark.slow
def test_two_identical_searches_creating_one_study_share_its_warm_starts(
    storage: tuple[str, str], tmp_path: Path
) -> None:
    url, name = storage
    results = race(tmp_path, url, name, [1, 1])
    assert [code for code, _ in results] == [0, 0], results
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).trials
    labels = [t.user_attrs["warm_start"] for t in trials if "warm_start" in t.user_attrs]
    assert labels and len(labels) == len(set(labels)) == 2, labels  # half of 4, once each


# Opens storage argv[1] for writing once $RACE_BARRIER (DIR:N) holds N files, one per process.
OPEN = """\
import os, sys, time
from pathlib import Path

from autoprune.study.storages import open_storage

barrier, expected = os.environ["RACE_BARRIER"].rsplit(":", 1)
Path(barrier, str(os.getpid())).touch()
deadline = time.monotonic() + 600
while len(os.listdir(barrier)) < int(expected):
    if time.monotonic() > deadline:
        raise SystemExit("the other processes never came")
    time.sleep(0.001)
open_storage(sys.argv[1], for_writing=True)
"""


@pytest.mark.slow
def test_processes_creating_one_new_database_at_once(tmp_path: Path) -> None:
    """Each round, four processes open one new SQLite file at once: Optuna creates its tables
    in each, and all but the first used to fail (``table studies already exists``,
    ``UNIQUE constraint failed: alembic_version``)."""
    for round in range(3):
        barrier = tmp_path / f"barrier{round}"
        barrier.mkdir()
        url = f"sqlite:///{tmp_path / f'new{round}.db'}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN, url],
                env=env(RACE_BARRIER=f"{barrier}:4"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err.strip().splitlines()[-1]
