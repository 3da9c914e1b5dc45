"""Opening storages: other applications' databases, files only read, malformed journal
records in mid-search, and studies that hold nothing (issue 15, items 7 and 8)."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from conftest import new_study
from optuna.storages import JournalStorage
from test_cli import run
from test_worker import PG_URL, SPEC, pg_available, run_search

import autoprune.study.loading as loading_module
from autoprune import load_study, make_setup, search
from autoprune.errors import StorageError
from autoprune.study.objective import Objective
from autoprune.study.storages import open_storage
from autoprune.study.study import open_study
from autoprune.task import Task, adam

# A malformed record, as another program (or an edit) could append it to a journal.
BAD_RECORD = '{"op_code": 0, "worker_id": "w", "study_name": "b"}\n'


def foreign_database(path: Path, *more: str) -> str:
    """Another application's SQLite file (a rollback journal, SQLite's default): a table
    with one row, and the tables ``more`` (SQL). Returns its URL."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users VALUES (1, 'ada')")
        for sql in more:
            db.execute(sql)
    db.close()
    return f"sqlite:///{path}"


def fingerprint(path: Path) -> tuple[bytes, int, list[str]]:
    """The file's bytes (its header holds the journal mode), its mtime, and the files beside
    it (a write would leave a -journal, -wal or -shm file, or a new database)."""
    return (
        path.read_bytes(),
        path.stat().st_mtime_ns,
        sorted(p.name for p in path.parent.iterdir()),
    )


def journal_mode(path: Path) -> str:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        db.close()


def one_line(e: BaseException) -> str:
    message = str(e)
    assert "\n" not in message, message
    return message


# --- another application's database (item 8) ----------------------------------------------


def test_a_foreign_database_is_refused_untouched(tiny_task: Task, tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    url = foreign_database(path)
    before = fingerprint(path)
    for attempt in (
        lambda: new_study(tiny_task, storage=url, study_name="s"),
        lambda: search(tiny_task, n_trials=1, storage=url, study_name="s", warm_start=None),
    ):
        with pytest.raises(StorageError) as info:
            attempt()
        assert one_line(info.value) == (
            f"storage {url!r} holds another application's tables (users) and no Optuna "
            "study; to add Optuna's tables to it, pass --create-in-existing (Python: "
            "create_in_existing=True)"
        )
    with pytest.raises(StorageError) as info:  # read-only: refused, nothing to opt into
        load_study(url, None)
    assert one_line(info.value) == f"storage {url!r} holds no Optuna study (its tables: users)"
    assert fingerprint(path) == before
    assert journal_mode(path) == "delete"


@pytest.mark.parametrize(
    ("table", "listed"),
    [
        ("alembic_version (version_num VARCHAR(32) PRIMARY KEY)", "alembic_version, users"),
        ("studies (id INTEGER PRIMARY KEY, title TEXT)", "studies, users"),
    ],
    ids=["migrated-by-alembic", "own-studies-table"],
)
def test_tables_named_like_optuna_s_are_not_optuna_s(
    tiny_task: Task, tmp_path: Path, table: str, listed: str
) -> None:
    """Every database that Alembic migrates has an alembic_version table, and an application
    may keep studies of its own: Optuna would add its tables, then fail on the version."""
    path = tmp_path / "app.db"
    url = foreign_database(path, f"CREATE TABLE {table}")
    before = fingerprint(path)
    with pytest.raises(StorageError, match=rf"holds another application's tables \({listed}\)"):
        new_study(tiny_task, storage=url, study_name="s")
    assert fingerprint(path) == before


def test_create_in_existing_adds_optuna_s_tables(tiny_task: Task, tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    url = foreign_database(path)
    setup = make_setup(tiny_task, warm_start=None)
    study = open_study(setup, tiny_task, storage=url, study_name="s", create_in_existing=True)
    assert study.study_name == "s"
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT * FROM users").fetchall() == [(1, "ada")]
    db.close()
    # It holds Optuna's tables now: opened again as any study's database, no flag needed.
    assert new_study(tiny_task, storage=url, study_name="s").study_name == "s"
    assert new_study(tiny_task, storage=url, study_name="t").study_name == "t"


@pytest.mark.parametrize("kind", ["missing", "empty", "optuna"])
def test_empty_missing_and_optuna_databases_open_as_before(
    tiny_task: Task, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "x.db"
    url = f"sqlite:///{path}"
    if kind == "empty":
        path.touch()
    elif kind == "optuna":
        optuna.create_study(storage=url, study_name="plain")
    study = new_study(tiny_task, storage=url, study_name="s")
    assert "s" in optuna.get_all_study_names(url) and study.trials == []


def test_a_postgresql_schema_of_another_application_is_refused(tiny_task: Task) -> None:
    if not pg_available():
        pytest.skip("no PostgreSQL answers `pg_isready -h 127.0.0.1`")
    schema = f"app_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as db:
        db.execute(sa.text(f"CREATE SCHEMA {schema}"))
        db.execute(sa.text(f"CREATE TABLE {schema}.users (id INTEGER PRIMARY KEY)"))
    try:
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"  # that schema, as its own database
        with pytest.raises(StorageError, match=r"holds another application's tables \(users\)"):
            new_study(tiny_task, storage=url, study_name="s")
        with pytest.raises(StorageError, match=r"holds no Optuna study \(its tables: users\)"):
            load_study(url, None)
        assert sa.inspect(engine).get_table_names(schema=schema) == ["users"]
    finally:
        with engine.begin() as db:
            db.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


@pytest.mark.parametrize("text", [b"hello\n", b"hello", b'{"a": 1}\n', b"[1, 2]\n{}\n"])
def test_a_file_that_is_not_a_journal_is_refused_untouched(
    tiny_task: Task, tmp_path: Path, text: bytes
) -> None:
    """Optuna skips a last line that it cannot read (a record still being written), so it
    would append its records to someone's one-line file; that file is left alone."""
    path = tmp_path / "notes.txt"
    path.write_bytes(text)
    url = f"journal:{path}"
    before = fingerprint(path)
    for attempt in (
        lambda: new_study(tiny_task, storage=url, study_name="s"),
        lambda: load_study(url, None),
    ):
        with pytest.raises(StorageError) as info:
            attempt()
        assert one_line(info.value) == (
            f"storage {url!r} is not an Optuna journal (its first line is not a journal "
            "record): it is left as it is"
        )
    assert fingerprint(path) == before


def test_a_journal_whose_first_record_is_being_written_is_opened(tmp_path: Path) -> None:
    """A first record without its newline yet is another process's, mid-write: not refused."""
    path = tmp_path / "j.log"
    path.write_bytes(b'{"op_code":0,"worker_id":"w"')
    assert isinstance(open_storage(f"journal:{path}"), JournalStorage)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.toml").write_text(SPEC.format(task="tiny", trials=2), encoding="utf-8")
    return tmp_path


def test_the_cli_refuses_a_foreign_database_untouched(workdir: Path, capsys: Any) -> None:
    path = workdir / "data" / "app.db"
    path.parent.mkdir()
    url = foreign_database(path)
    before = fingerprint(path)
    code, out, err = run(capsys, "search", "spec.toml", "-q", "--storage", url)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"autoprune: error: storage {url!r} holds another application's tables (users) and "
        "no Optuna study; to add Optuna's tables to it, pass --create-in-existing (Python: "
        "create_in_existing=True)"
    ]
    for argv in (["front"], ["status"], ["pick", "--knee"], ["report"], ["export", "0"]):
        extra = ["--out", "exported"] if argv[0] == "export" else []
        code, out, err = run(capsys, *argv, "--storage", url, *extra)
        assert code == 2, argv
        assert (
            err == f"autoprune: error: storage {url!r} holds no Optuna study (its tables: users)\n"
        )
    assert fingerprint(path) == before
    code, out, err = run(
        capsys, "search", "spec.toml", "-q", "--storage", url, "--create-in-existing"
    )
    assert code == 0, err
    assert "study 'worker_tasks:tiny': 2 trials (2 complete)" in out


# --- commands that only read (item 8) ------------------------------------------------------

READ_ONLY = [
    ["front"],
    ["front", "--csv", "front.csv"],
    ["front", "--json", "front.json"],
    ["status"],
    ["pick", "--knee"],
    ["pick", "--min-accuracy", "0"],
    ["report", "--out", "report.html"],
    ["export", "0", "--out", "exported"],
]


def test_read_only_commands_leave_a_rollback_journal_database_as_it_is(
    workdir: Path, capsys: Any
) -> None:
    """Searched (which turns on WAL), then turned back to a rollback journal, as another
    program may keep it: every command that reads leaves it so, byte for byte."""
    code, _, err = run_search(workdir, SPEC.format(task="tiny", trials=2))  # its own process
    assert code == 0, err
    path = workdir / "db" / "s.db"
    path.parent.mkdir()
    (workdir / "s.db").rename(path)  # alone in its directory: nothing is written beside it
    url = f"sqlite:///{path}"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    db.close()
    before = fingerprint(path)
    for argv in READ_ONLY:
        code, _, err = run(capsys, *argv, "--storage", url)
        assert code == 0, (argv, err)
        assert fingerprint(path) == before, argv
        assert journal_mode(path) == "delete", argv


@pytest.mark.parametrize("command", ["front", "status", "pick", "report", "export", "worker"])
def test_reading_an_empty_database_writes_nothing(
    workdir: Path, capsys: Any, command: str
) -> None:
    """An empty file is not given Optuna's tables by a command that only reads it (nor by a
    worker, which joins a study that must exist)."""
    path = workdir / "empty.db"
    path.touch()
    url = f"sqlite:///{path}"
    argv = {"export": ["export", "0", "--out", "x"], "pick": ["pick", "--knee"]}.get(
        command, [command]
    )
    code, _, err = run(capsys, *argv, "--storage", url)
    assert code == 2
    assert err == f"autoprune: error: storage {url!r} holds no Optuna study (it holds no tables)\n"
    assert path.stat().st_size == 0


# --- a malformed journal record in mid-search (item 7) -------------------------------------


def spoil(path: Path) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(BAD_RECORD)


def assert_malformed(e: BaseException, url: str) -> None:
    assert one_line(e) == (
        f"storage {url!r} holds a malformed record (KeyError: 'directions'): it was not "
        "written by Optuna, or was edited"
    )


@pytest.mark.parametrize("when", ["between trials", "in a trial"])
def test_a_malformed_record_in_mid_search_is_a_storage_error(
    tiny_task: Task, tmp_path: Path, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """Another writer appends a record that Optuna did not write while the search runs: the
    next read of the journal, wherever it comes, stops the search with one StorageError, and
    Optuna logs no traceback for the trial it failed."""
    path = tmp_path / "j.log"
    url = f"journal:{path}"
    optimizers = []

    def spoiling(params: Any, lr: float) -> Any:  # the task builds one per trial
        optimizers.append(lr)
        if len(optimizers) == 2:
            spoil(path)
        return adam(params, lr)

    after_first = [lambda study, trial: spoil(path) if trial.number == 0 else None]
    task = (
        dataclasses.replace(tiny_task, optimizer=spoiling) if when == "in a trial" else tiny_task
    )
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError) as info:
        search(
            task,
            n_trials=4,
            storage=url,
            study_name="s",
            warm_start=None,
            callbacks=after_first if when == "between trials" else (),
        )
    assert_malformed(info.value, url)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_the_cli_names_a_malformed_record_in_mid_search(
    workdir: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = workdir / "j.log"
    url = f"journal:{path}"
    calls = []
    real = Objective.__call__

    def spoiling(self: Objective, trial: optuna.Trial) -> Any:
        calls.append(trial.number)
        if len(calls) == 2:
            spoil(path)
        return real(self, trial)

    monkeypatch.setattr(Objective, "__call__", spoiling)
    spec = SPEC.format(task="tiny", trials=4) + "\n[warm_start]\nallocations = []\n"
    (workdir / "spec.toml").write_text(spec, encoding="utf-8")
    code, _, err = run(capsys, "search", "spec.toml", "-q", "--storage", url)
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == (
        f"autoprune: error: storage {url!r} holds a malformed record (KeyError: 'directions'): "
        "it was not written by Optuna, or was edited"
    )


# --- a study that holds nothing (item 5 of the brief: no 30 s wait for a hand-made one) ----


@pytest.fixture
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a test that waits for a setup (SETUP_WAIT) instead of refusing at once."""

    def sleep(seconds: float) -> None:
        raise AssertionError("waited for a setup that no search is storing")

    monkeypatch.setattr(loading_module.time, "sleep", sleep)  # the one wait: load_study's


@pytest.mark.usefixtures("no_waiting")
def test_an_empty_study_made_by_hand_is_refused_at_once(tiny_task: Task, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    optuna.create_study(storage=url, study_name="hand")  # one direction: minimize
    optuna.create_study(
        storage=url, study_name="three", directions=["maximize", "minimize", "minimize"]
    )
    with pytest.raises(StorageError) as info:
        new_study(tiny_task, storage=url, study_name="hand")
    assert one_line(info.value) == (
        "study 'hand' holds nothing, and its directions (minimize) are not this search's "
        "(maximize, minimize): it was made by hand, or for other objectives"
    )
    with pytest.raises(StorageError) as info:  # made for three objectives, joined for two
        new_study(tiny_task, storage=url, study_name="three")
    assert "its directions (maximize, minimize, minimize) are not this search's" in str(info.value)
    with pytest.raises(StorageError) as info:  # a worker, which brings no setup
        load_study(url, "hand", wait=True)
    assert one_line(info.value) == (
        "study 'hand' holds nothing, and its directions (minimize) are not an autoprune "
        "study's: it was made by hand, or for other objectives"
    )


def test_an_empty_study_that_a_search_may_be_creating_is_waited_for(
    tiny_task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Directions like a search's: its creator may store the setup any moment, so the
    study is waited for (here briefly) before it is refused."""
    monkeypatch.setattr(loading_module, "SETUP_WAIT", 0.2)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    optuna.create_study(storage=url, study_name="s", directions=["maximize", "minimize"])
    for attempt in (
        lambda: new_study(tiny_task, storage=url, study_name="s"),
        lambda: load_study(url, "s", wait=True),
    ):
        with pytest.raises(StorageError, match=r"none came in 0\.2 s\)$"):
            attempt()


def test_creation_retries_outlast_every_object_optuna_creates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes creating one new database fail once per table or version row another made
    first: five attempts once ran out with six processes under load."""
    from autoprune.study import storages

    url = f"sqlite:///{tmp_path / 'new.db'}"
    optuna.storages.RDBStorage(url)
    engine = sa.create_engine(url)
    tables = sa.inspect(engine).get_table_names()  # Optuna's and Alembic's
    engine.dispose()
    objects = len(tables) + 2  # and the two version rows
    assert objects < storages._CREATE_ATTEMPTS
    failures = iter(range(objects))
    opened = storages._open_rdb

    def made_meanwhile(*args: Any, **kwargs: Any) -> Any:
        for n in failures:
            raise sa.exc.IntegrityError("INSERT", {}, Exception(f"UNIQUE constraint failed {n}"))
        return opened(*args, **kwargs)

    monkeypatch.setattr(storages, "_open_rdb", made_meanwhile)
    assert open_storage(url, for_writing=True).engine.name == "sqlite"
