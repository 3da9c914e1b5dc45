"""Storages for studies that many workers share: RDB with heartbeats, or a journal file.

An RDB URL (``sqlite:///x.db``, ``postgresql+psycopg://user@host/db``) opened for running
trials gets Optuna's heartbeats: every running trial records a heartbeat every
``heartbeat`` seconds, and a trial silent for ``GRACE_FACTOR`` times as long (its worker was
killed, or its machine lost) is failed by the next worker that starts a trial, and retried
(:data:`RETRY`). ``journal:PATH`` opens Optuna's journal file storage, which has no
heartbeats (see the README for what it does keep safe).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial

JOURNAL_PREFIX = "journal:"
HEARTBEAT = 10  # seconds between two heartbeats of a running trial
GRACE_FACTOR = 3  # heartbeats a trial may miss before it is failed as stale
MAX_RETRY = 3  # a policy that kills its worker every time is not retried for ever


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that re-queues a failed trial (same params) as a WAITING trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the failed trials that a later trial retries.

    Read as ``RetryHeartbeatStaleTrialCallback.retry_history`` reads it (the system attr
    that the callback writes); the helper itself warns on every call, once per trial.
    """
    return {number for t in trials for number in t.system_attrs.get("retry_history", ())}


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


def open_rdb(url: str, *, heartbeat: int | None) -> RDBStorage:
    """Optuna's RDB storage; with ``heartbeat`` seconds, stale trials are failed and retried."""
    if heartbeat is None:
        return RDBStorage(url)
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
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
