"""Storages for studies that many workers share: RDB with heartbeats, or a journal file.

An RDB URL (``sqlite:///x.db``, ``postgresql+psycopg://user@host/db``) opened for running
trials gets Optuna's heartbeats: every running trial records a heartbeat every
``heartbeat`` seconds, and a trial silent for ``GRACE_FACTOR`` times as long (its worker was
killed, or its machine lost) is failed by the next worker that starts a trial, and retried
(:data:`RETRY`). ``journal:PATH`` opens Optuna's journal file storage, which has no
heartbeats (see the README for what it does keep safe).

:func:`open_storage` opens a URL once for all that follows; whatever the storage layer raises
becomes a one-line :class:`~autoprune.errors.StorageError` naming the URL, its password
hidden (:func:`storage_errors`). Other people's files are left alone: Optuna's tables are
added to no database that holds another application's tables unless the user asks
(``--create-in-existing``), and a database only read is not written at all.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from autoprune.errors import StorageError
from autoprune.study._optuna import LeanRDBStorage

JOURNAL_PREFIX = "journal:"
HEARTBEAT = 10  # seconds between two heartbeats of a running trial
GRACE_FACTOR = 3  # heartbeats a trial may miss before it is failed as stale
MAX_RETRY = 3  # a policy that kills its worker every time is not retried for ever
# User attr of a trial that reruns an interrupted one (SIGINT/SIGTERM): the interrupted number.
RESUMES_ATTR = "resumes"


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that re-queues a failed trial (same params) as a WAITING trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def will_retry(trial: FrozenTrial) -> bool:
    """Whether :func:`retry_callback` re-queues ``trial`` (it has not used up ``MAX_RETRY``)."""
    return len(trial.system_attrs.get("retry_history", ())) < MAX_RETRY


def resume_later(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue an interrupted trial's params again, as a WAITING trial whose user attr
    ``RESUMES_ATTR`` names it.

    Unlike a retry, a resumption does not count toward ``MAX_RETRY``: the policy did nothing
    wrong, so a study stopped any number of times loses none. The retry history of earlier
    crashes is kept (the system attrs are copied, as Optuna's retry callback copies them).
    """
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={**trial.user_attrs, RESUMES_ATTR: trial.number},
            system_attrs=trial.system_attrs,
        )
    )


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the failed trials that a later trial retries or resumes.

    Retries are read as ``RetryHeartbeatStaleTrialCallback.retry_history`` reads them (the
    system attr that the callback writes; the helper itself warns on every call, once per
    trial); resumptions by their ``RESUMES_ATTR``.
    """
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", ())}
    return retried | {t.user_attrs[RESUMES_ATTR] for t in trials if RESUMES_ATTR in t.user_attrs}


def is_journal(url: Any) -> bool:
    """Whether ``url`` names a journal file (``journal:PATH``)."""
    return isinstance(url, str) and url.startswith(JOURNAL_PREFIX)


def journal_path(url: str) -> Path:
    """The file of ``journal:PATH`` (``journal:///abs/path`` also works)."""
    rest = url[len(JOURNAL_PREFIX) :]
    return Path(rest[2:] if rest.startswith("//") else rest)


def open_journal(url: str) -> JournalStorage:
    """Optuna's journal storage on the file of ``url`` (created if missing); a malformed
    record in it is a :class:`StorageError` wherever it is read (see :class:`_Journal`)."""
    path = journal_path(url)
    if not str(path).strip() or path.is_dir():
        raise ValueError(f"journal storage needs a file path, got {url!r}")
    if not _journal_or_empty(path):
        raise StorageError(
            f"storage {describe(url)} is not an Optuna journal (its first line is not a "
            "journal record): it is left as it is"
        )
    return _Journal(JournalFileBackend(str(path)))


# How Optuna writes every journal record (json.dumps of a dict whose first key is op_code).
_RECORD_START = b'{"op_code":'


def _journal_or_empty(path: Path) -> bool:
    """Whether ``path`` is missing, empty, or begins with a journal record. Optuna would
    append its records to any file, and skip a last line it cannot read (a record still
    being written): a one-line text file of someone else's would get them."""
    try:
        with path.open("rb") as f:
            first = f.readline(1 << 20)
    except FileNotFoundError:
        return True
    if not first.endswith(b"\n"):  # empty, or a first record still being written
        return _RECORD_START.startswith(first[: len(_RECORD_START)])
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "op_code" in record


class _Journal(JournalStorage):
    """Optuna's journal storage, which names a malformed record instead of failing on it.

    Every call replays the records that other processes appended since the last one, taking
    each as it comes: a record that Optuna did not write (another program's, or an edit)
    raises KeyError, TypeError, ValueError, ... from whatever call came next, in mid-search
    as well as on opening. Here it is a one-line StorageError naming the file.
    """

    # JournalStorage._sync_with_backend is private; every public method calls it first
    # (checked against Optuna 5.0).
    def _sync_with_backend(self) -> None:
        try:
            super()._sync_with_backend()
        except _REPLAY_ERRORS as e:
            raise StorageError(
                f"storage {describe(self)} holds a malformed record ({type(e).__name__}: "
                f"{_first_line(e)}): it was not written by Optuna, or was edited"
            ) from e


# What replaying a malformed record raises: a missing key, a wrong type or value (also bad
# JSON), an unknown operation (an assert).
_REPLAY_ERRORS = (KeyError, TypeError, ValueError, AssertionError, IndexError)


def open_rdb(
    url: str, *, heartbeat: int | None, read: bool = False, lean: bool = False
) -> RDBStorage:
    """Optuna's RDB storage; with ``heartbeat`` seconds, stale trials are failed and retried;
    ``lean``: its cache holds finished trials without their bulky records, for processes that
    run trials (:class:`autoprune.study._optuna.LeanRDBStorage`).

    Opening a new database creates Optuna's tables and stamps their version (not with
    ``read``: a database only read gets no table it lacks). Two processes that open one new
    database at once both try it, and all but one fail on a table or version row the other
    made first: they open it again, and find it made.
    """
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            return _open_rdb(url, heartbeat=heartbeat, read=read, lean=lean)
        except sqlalchemy.exc.DBAPIError as e:  # IntegrityError, OperationalError, ...
            if attempt == _CREATE_ATTEMPTS - 1 or not _made_meanwhile(e):
                raise
    raise AssertionError("unreachable")


# Each failed attempt means that another process made one more of what Optuna creates in a new
# database (its 12 tables, its version row, Alembic's table and version row), which no later
# attempt can fail on again: one attempt more than those never gives up while others progress.
# (Five once ran out: six processes under load failed up to three times each.)
_CREATE_ATTEMPTS = 16
_MADE_MEANWHILE = ("already exists", "alembic_version", "version_info", "UNIQUE", "duplicate key")


def _made_meanwhile(e: Exception) -> bool:
    """Whether ``e`` says that another process created a table or version row first."""
    return any(text in _first_line(e) for text in _MADE_MEANWHILE)


def _open_rdb(url: str, *, heartbeat: int | None, read: bool, lean: bool) -> RDBStorage:
    kind = LeanRDBStorage if lean else RDBStorage
    if heartbeat is None:
        return kind(url, skip_table_creation=read)
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return kind(
            url,
            heartbeat_interval=heartbeat,
            grace_period=GRACE_FACTOR * heartbeat,
            heartbeat_stale_trial_callback=retry_callback(),
        )


# Optuna's first two tables and their columns (checked against Optuna 5.0): a database that
# holds either holds Optuna's schema, or is being given it by another process right now
# (Optuna makes "studies" first, then "version_info"; its other tables refer to "studies").
# Not "alembic_version": every database that Alembic migrates has one.
_OPTUNA_TABLES = {
    "studies": {"study_id", "study_name"},
    "version_info": {"version_info_id", "schema_version", "library_version"},
}


def _check_schema(url: str, *, for_writing: bool, create_in_existing: bool) -> None:
    """Refuse to read a database without Optuna's tables, and to add Optuna's tables to a
    database that holds another application's (unless ``create_in_existing``); an empty or
    missing database may be written. Reads the table names only: nothing is written."""
    tables, optuna_schema = ([], False) if missing_file(url) else _schema(url)
    if optuna_schema:
        return
    theirs = f"its tables: {_listed(tables)}" if tables else "it holds no tables"
    if not for_writing:
        raise StorageError(f"storage {describe(url)} holds no Optuna study ({theirs})")
    if tables and not create_in_existing:
        raise StorageError(
            f"storage {describe(url)} holds another application's tables ({_listed(tables)}) "
            "and no Optuna study; to add Optuna's tables to it, pass --create-in-existing "
            "(Python: create_in_existing=True)"
        )


def _schema(url: str) -> tuple[list[str], bool]:
    """The database's table names, and whether they are Optuna's (see _OPTUNA_TABLES)."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        inspector = sqlalchemy.inspect(engine)
        tables = sorted(inspector.get_table_names())
        optuna_schema = any(
            name in tables and columns <= {c["name"] for c in inspector.get_columns(name)}
            for name, columns in _OPTUNA_TABLES.items()
        )
        return tables, optuna_schema
    finally:
        engine.dispose()


def _listed(names: list[str], most: int = 5) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def missing_file(url: Any) -> bool:
    """Whether ``url`` names a SQLite or journal file that does not exist (opening it would
    leave an empty one behind)."""
    if is_journal(url):
        return not journal_path(url).exists()
    if not isinstance(url, str) or not url.startswith("sqlite:"):
        return False
    try:
        database = sqlalchemy.engine.make_url(url).database
    except Exception:  # a malformed URL: let Optuna say what is wrong with it
        return False
    return database not in (None, "", ":memory:") and not Path(database).exists()


def open_storage(
    storage: Any,
    *,
    for_writing: bool = False,
    heartbeat: int | None = HEARTBEAT,
    create_in_existing: bool = False,
) -> Any:
    """A URL becomes a storage object, opened once for all that follows.

    ``journal:PATH`` opens a journal file (see :func:`open_journal`). An RDB opened for
    writing (running trials) gets heartbeats every ``heartbeat`` seconds, keeps finished
    trials lean in its cache (``open_rdb``), and a SQLite file is switched to write-ahead
    logging (see :func:`_sqlite_pragmas`). Opened only to read, a
    database is left as it is found: no table, version row or journal mode is written.

    Raises:
        StorageError: If the storage cannot be opened; if it is to be read and holds no
            Optuna tables; or if it is to be written and holds another application's tables
            but not Optuna's (Optuna's would be added to them), unless ``create_in_existing``.
    """
    if not isinstance(storage, str):
        return storage
    with storage_errors(storage):
        if is_journal(storage):
            return open_journal(storage)
        _check_schema(storage, for_writing=for_writing, create_in_existing=create_in_existing)
        opened = open_rdb(
            storage,
            heartbeat=heartbeat if for_writing else None,
            read=not for_writing,
            lean=for_writing,
        )
    if for_writing and opened.engine.name == "sqlite":
        sqlalchemy.event.listen(opened.engine, "connect", _sqlite_pragmas)
        sqlalchemy.event.listen(opened.engine, "begin", _sqlite_begin)
        opened.engine.dispose()  # reconnect, so that every pooled connection gets the pragmas
    return opened


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # A trial makes ~17 small commits. With WAL and synchronous=NORMAL a commit does not wait
    # for the disk (measured: 2.6 -> 1.2 ms per user attr), and readers such as `autoprune
    # report` do not block the search. A killed process loses nothing committed; a power cut
    # may lose the last commits but never corrupts the file. WAL needs a local file system.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
    connection.isolation_level = None  # transactions begin in _sqlite_begin, not implicitly


def _sqlite_begin(connection: Any) -> None:
    # pysqlite begins a transaction only at the first write, so Optuna's read-then-update
    # (claiming a WAITING trial) is not atomic: two workers could claim one enqueued trial
    # and both run it. BEGIN IMMEDIATE takes the write lock first (SQLAlchemy's recipe).
    connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def storage_errors(storage: Any) -> Iterator[None]:
    """Turn whatever the storage layer raises into one-line StorageErrors naming the URL."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        causes = _causes(e)
        for cause in causes:
            if any(text in str(cause) for text in _READ_ONLY):
                raise StorageError(
                    f"cannot write to storage {describe(storage)}: it is read-only "
                    f"({_first_line(cause)})"
                ) from e
        # Optuna says only that "an exception is raised during the commit": say which.
        said = causes[-1] if isinstance(e, optuna.exceptions.StorageInternalError) else e
        raise StorageError(f"cannot open storage {describe(storage)}: {_first_line(said)}") from e


# What SQLite and PostgreSQL say when a database cannot be written.
_READ_ONLY = ("readonly database", "read-only transaction", "read-only file system")


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from (or while handling), outermost first."""
    chain = [e]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) and cause not in chain:
        chain.append(cause)
    return chain


def describe(storage: Any) -> str:
    """The storage's URL with any password hidden, for messages."""
    url = storage if isinstance(storage, str) else getattr(storage, "url", None)
    if url is None and isinstance(storage, JournalStorage):  # Optuna keeps the path private
        path = getattr(getattr(storage, "_backend", None), "_file_path", None)
        url = None if path is None else JOURNAL_PREFIX + str(path)
    if url is None:
        return type(storage).__name__
    try:
        return repr(sqlalchemy.engine.make_url(url).render_as_string(hide_password=True))
    except Exception:  # not a URL SQLAlchemy can parse: say it as given
        return repr(url)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
