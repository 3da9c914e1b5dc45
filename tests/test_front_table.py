"""The autoprune_front table: Optuna's front as plain SQL, beside Optuna's untouched tables."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import sqlalchemy as sa
from test_report import VALUES, hand_made_trial

from autoprune import Task, search
from autoprune.study.artifacts import ARTIFACT_ID_ATTR
from autoprune.study.front_table import METRIC_COLUMNS, TABLE, FrontTable

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def hand_made(storage: Any, name: str, values: list[tuple[float, float]]) -> optuna.Study:
    study = optuna.create_study(
        storage=storage, study_name=name, directions=["maximize", "minimize"]
    )
    study.set_metric_names(["accuracy", "nonzero_params"])
    for i, (accuracy, nonzero) in enumerate(values):
        study.add_trial(hand_made_trial(accuracy, nonzero, i))
    return study


def read(engine: sa.Engine, table: str = TABLE) -> pd.DataFrame:
    frame = pd.read_sql(f"SELECT * FROM {table} ORDER BY study_name, trial_number", engine)
    return frame


def test_search_writes_the_front(tiny_task: Task, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'run.db'}"
    study = search(tiny_task, n_trials=4, storage=storage, study_name="s", seed=5)
    frame = read(sa.create_engine(storage))
    front = sorted(study.best_trials, key=lambda t: t.number)
    assert list(frame["trial_number"]) == [t.number for t in front]
    assert set(frame["study_name"]) == {"s"}
    for row, trial in zip(frame.itertuples(), front, strict=True):
        assert (row.accuracy, row.nonzero_params) == tuple(trial.values)
        assert row.test_accuracy == trial.user_attrs["test_accuracy"]
        assert row.density == trial.user_attrs["density"]
        assert row.bytes is None or pd.isna(row.bytes)  # not an objective of this study
        assert json.loads(row.policy) == trial.user_attrs["policy"]
        assert json.loads(row.metrics)["nonzero_params"] == trial.values[1]
        assert row.artifact_id == trial.user_attrs[ARTIFACT_ID_ATTR]
        assert row.updated_at is not None


def optuna_tables(engine: sa.Engine) -> dict[str, list[Any]]:
    with engine.connect() as connection:
        names = [n for n in sa.inspect(connection).get_table_names() if n != TABLE]
        return {
            name: sorted(map(tuple, connection.execute(sa.text(f"SELECT * FROM {name}"))), key=str)
            for name in names
        }


def test_rows_are_replaced_per_study_and_optuna_is_untouched(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    storage = optuna.storages.RDBStorage(url)
    a = hand_made(storage, "a", VALUES)
    b = hand_made(storage, "b", VALUES[:2])
    table = FrontTable(storage.engine)
    before = optuna_tables(storage.engine)
    assert table.write(a) == 5 and table.write(b) == 2
    assert optuna_tables(storage.engine) == before
    frame = read(storage.engine)
    assert list(frame.loc[frame["study_name"] == "a", "trial_number"]) == [0, 1, 3, 5, 6]
    assert list(frame.loc[frame["study_name"] == "b", "trial_number"]) == [0, 1]
    assert list(frame.columns[2 : 2 + len(METRIC_COLUMNS)]) == list(METRIC_COLUMNS)
    # A trial that dominates all of b: the callback rewrites b's rows only.
    b.add_trial(hand_made_trial(1.0, 1, 2))
    table(b, b.trials[-1])
    frame = read(storage.engine)
    assert list(frame.loc[frame["study_name"] == "b", "trial_number"]) == [2]
    assert len(frame[frame["study_name"] == "a"]) == 5
    # A dominated trial changes nothing: no write at all.
    b.add_trial(hand_made_trial(0.1, 50, 3))
    stamp = read(storage.engine)["updated_at"].tolist()
    table(b, b.trials[-1])
    assert read(storage.engine)["updated_at"].tolist() == stamp
    # Optuna and optuna-dashboard still read the database.
    assert optuna.load_study(study_name="a", storage=url).best_trials
    assert_dashboard_opens(url, b)


def assert_dashboard_opens(url: str, study: optuna.Study) -> None:
    dashboard = pytest.importorskip("optuna_dashboard", reason="optuna-dashboard not installed")
    app = dashboard.wsgi(url)
    status: list[str] = []
    for path in ("/api/studies", f"/api/studies/{study._study_id}"):
        status.clear()
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "SERVER_NAME": "test",
            "SERVER_PORT": "80",
            "wsgi.input": io.BytesIO(),
            "wsgi.errors": io.StringIO(),
            "wsgi.url_scheme": "http",
        }
        body = b"".join(app(environ, lambda s, h, *_: status.append(s)))
        assert status[0].startswith("200"), (path, status, body[:200])
        if path != "/api/studies":
            assert json.loads(body)["objective_names"] == ["accuracy", "nonzero_params"]


def postgres_ready() -> str | None:
    """None if the test database answers, else why not."""
    if shutil.which("pg_isready") is None:
        return "pg_isready is not installed"
    answer = subprocess.run(
        ["pg_isready", "-h", "127.0.0.1"], capture_output=True, text=True, timeout=10
    )
    if answer.returncode != 0:
        return f"PostgreSQL at 127.0.0.1 does not answer: {answer.stdout.strip()}"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    return None


def test_postgresql() -> None:
    reason = postgres_ready()
    if reason is not None:
        pytest.skip(reason)
    engine = sa.create_engine(PG_URL)
    name = f"autoprune_front_test_{uuid.uuid4().hex[:8]}"  # shared database: our own table
    study = hand_made(None, "pg", VALUES)
    table = FrontTable(engine, name=name)
    try:
        assert table.write(study) == 5
        assert table.write(study) == 5  # replaced, not appended
        frame = read(engine, name)
        assert list(frame["trial_number"]) == [0, 1, 3, 5, 6]
        assert frame["updated_at"].dt.tz is not None
    finally:
        table.table.drop(engine, checkfirst=True)
        engine.dispose()


def test_a_failed_write_does_not_stop_the_search(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = hand_made(None, "s", VALUES[:1])
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'gone' / 'x.db'}")  # no such directory
    FrontTable(engine)(study, study.trials[0])
    assert "could not write the autoprune_front table" in caplog.text
