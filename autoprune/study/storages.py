"""Storages for studies that many workers share: RDB with heartbeats, or a journal file.

An RDB URL (``sqlite:///x.db``, ``postgresql+psycopg://user@host/db``) opened for running
trials gets Optuna's heartbeats: every running trial records a heartbeat every
``heartbeat`` seconds, and a trial silent for ``GRACE_FACTOR`` times as long (its worker was
killed, or its machine lost) is failed by the next worker that starts a trial, and retried
(:data:`RETRY`). ``journal:PATH`` opens Optuna's journal file storage, which has no
heartbeats (see the README for what it does keep safe).

:func:`open_storage` opens a URL once for all that follows; whatever the storage layer raises
becomes a one-line :class:`~autoprune.errors.StorageError` naming the URL, its password
hidden (:func:`storage_errors`).
"""

from __future__ import annotations

import traceback
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
    """Optuna's journal storage on the file of ``url`` (created if missing)."""
    path = journal_path(url)
    if not str(path).strip() or path.is_dir():
        raise ValueError(f"journal storage needs a file path, got {url!r}")
    return JournalStorage(JournalFileBackend(str(path)))


def open_rdb(url: str, *, heartbeat: int | None, lean: bool = False) -> RDBStorage:
    """Optuna's RDB storage; with ``heartbeat`` seconds, stale trials are failed and retried;
    ``lean``: its cache holds finished trials without their bulky records, for processes that
    run trials (:class:`autoprune.study._optuna.LeanRDBStorage`).

    Opening a new database creates Optuna's tables and stamps their version. Two processes
    that open one new database at once both try it, and all but one fail on a table or
    version row the other made first: they open it again, and find it made.
    """
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            return _open_rdb(url, heartbeat=heartbeat, lean=lean)
        except sqlalchemy.exc.DBAPIError as e:  # IntegrityError, OperationalError, ...
            if attempt == _CREATE_ATTEMPTS - 1 or not _made_meanwhile(e):
                raise
    raise AssertionError("unreachable")


_CREATE_ATTEMPTS = 5  # each failed one means that another process made more of the tables
_MADE_MEANWHILE = ("already exists", "alembic_version", "version_info", "UNIQUE", "duplicate key")


def _made_meanwhile(e: Exception) -> bool:
    """Whether ``e`` says that another process created a table or version row first."""
    return any(text in _first_line(e) for text in _MADE_MEANWHILE)


def _open_rdb(url: str, *, heartbeat: int | None, lean: bool) -> RDBStorage:
    kind = LeanRDBStorage if lean else RDBStorage
    if heartbeat is None:
        return kind(url)
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return kind(
            url,
            heartbeat_interval=heartbeat,
            grace_period=GRACE_FACTOR * heartbeat,
            heartbeat_stale_trial_callback=retry_callback(),
        )


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
    storage: Any, *, for_writing: bool = False, heartbeat: int | None = HEARTBEAT
) -> Any:
    """A URL becomes a storage object, opened once for all that follows.

    ``journal:PATH`` opens a journal file (see :func:`open_journal`). An RDB opened for
    writing (running trials) gets heartbeats every ``heartbeat`` seconds, keeps finished
    trials lean in its cache (``open_rdb``), and a SQLite file is switched to write-ahead
    logging (see :func:`_sqlite_pragmas`); read-only commands leave the file as they find it.
    """
    if not isinstance(storage, str):
        return storage
    with storage_errors(storage):
        if is_journal(storage):
            return open_journal(storage)
        opened = open_rdb(storage, heartbeat=heartbeat if for_writing else None, lean=for_writing)
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
    except Exception as e:
        if _in_journal_replay(e):
            raise StorageError(
                f"storage {describe(storage)} holds a malformed record ({type(e).__name__}: "
                f"{_first_line(e)}): it was not written by Optuna, or was edited"
            ) from e
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


def _in_journal_replay(e: BaseException) -> bool:
    """Whether ``e`` is Optuna's journal storage failing to read or replay a record (it
    takes each record as it comes: a bad one raises KeyError, TypeError, ValueError, ...)."""
    if not isinstance(e, (KeyError, TypeError, ValueError, AssertionError, IndexError)):
        return False
    frames = traceback.extract_tb(e.__traceback__)
    return any(
        "storages" in frame.filename
        and "journal" in frame.filename
        and (frame.name == "read_logs" or "apply" in frame.name)
        for frame in frames
    )


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
