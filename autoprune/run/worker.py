"""A worker: runs trials of a shared study until the study holds its target number of trials.

Many workers (processes, machines) may run one study at once. The budget is the study's:
a worker starts trials while fewer than ``target`` trials count (see :func:`counted`), so
that resumes and workers together reach the target exactly. What can go wrong is handled so
that no completed trial is lost and no trial stays RUNNING:

- A trial that hits a NaN loss or runs out of device memory fails alone (``fail_reason`` in
  its user attrs; the memory is released, see :class:`autoprune.study.objective.Objective`).
- SIGINT/SIGTERM fail the running trial at once (``fail_reason`` says so), queue its policy
  to be retried, and end the worker normally. A signal that lands while the trial writes to
  the storage lets it finish instead, so no write is cut in half. A worker that got a signal
  claims no more work, and a resumption does not use up the retries of a crashing policy
  (:func:`autoprune.study.storages.resume_later`): however often a study is stopped, it
  loses no policy and reaches its target exactly.
- A worker killed outright leaves its trial RUNNING: with RDB heartbeats another worker fails
  it once it is stale and retries it; a worker on the same machine sees at once that the
  trial's process is gone (:func:`recover_orphans`).
- Before it ends, a worker waits for the trials still running that can be resolved (alive
  here, or heartbeat-watched), so that the last worker of a study leaves none RUNNING.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import signal
import socket
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from autoprune import devices
from autoprune._version import __version__
from autoprune.errors import SpecError, StorageError, TrialFailed
from autoprune.run.budget import STATE_WORDS, SURPLUS_ATTR, WORKER_ATTR, count_tracker
from autoprune.study import _optuna
from autoprune.study.fidelity import DUPLICATE, PROMOTED_ATTR, duplicate_of
from autoprune.study.loading import load_study
from autoprune.study.objective import Objective
from autoprune.study.samplers import make_sampler
from autoprune.study.setup import DEFAULT_SAMPLER, StudySetup, make_setup, read_setup, study_task
from autoprune.study.storages import (
    HEARTBEAT,
    MAX_RETRY,
    resume_later,
    retry_callback,
    will_retry,
)
from autoprune.study.study import Callback, objective_for, open_study
from autoprune.study.trials import full_trial
from autoprune.task import Task
from autoprune.tasks import TASKS

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Modules whose calls a signal must not cut in half (the trial finishes instead).
_STORAGE_MODULES = ("optuna.storages", "sqlalchemy", "psycopg", "sqlite3")


class Interrupted(TrialFailed):
    """The worker got SIGINT or SIGTERM during a trial; the trial fails and is retried."""


def worker_id() -> str:
    """``host:pid`` of this process, as recorded in the trials it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass
class WorkerSummary:
    """What one worker did: its trials by final state, and the signal that stopped it."""

    worker: str
    states: Counter[str] = dataclasses.field(default_factory=Counter)
    signal: str | None = None
    retried: list[int] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        n = sum(self.states.values())
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.states.items())) or "none"
        text = f"worker {self.worker}: {n} trials ({states})"
        if self.signal:
            text += f"; stopped by {self.signal}"
        if self.retried:
            text += f"; trial {', '.join(map(str, self.retried))} queued for retry"
        return text


class _Stop:
    """Signal state shared by the handler, the objective and the loop (see :func:`stopping`)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.in_trial = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = self.signal or signal.Signals(signum).name  # Ctrl-C, then forwarded TERM
        if self.in_trial and not _in_storage_call(frame):
            self.in_trial = False  # one exception per trial
            raise Interrupted(f"interrupted by {self.signal}; queued for retry")


def _in_storage_call(frame: FrameType | None) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


class _WorkerObjective:
    """The study's objective, tagged with the worker, refused past the target, interruptible."""

    def __init__(self, objective: Objective, target: float, stop: _Stop, me: str):
        self.objective, self.target, self.stop, self.me = objective, target, stop, me
        # A screened trial sets aside compute for the promotions it earns (budget.weight).
        self.reserve = objective.fidelity.promote if objective.fidelity is not None else 0.0

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        trial.set_user_attr(WORKER_ATTR, self.me)
        tracker = count_tracker(trial.study, reserve=self.reserve)
        promoted = self.reserve and PROMOTED_ATTR in trial.user_attrs
        if promoted:  # paid for by its screened trial: never surplus, unless a duplicate
            self._refuse_duplicate(trial, tracker.trials)
        elif tracker.before(trial.number) >= self.target:  # another worker started it first
            trial.set_user_attr(SURPLUS_ATTR, True)
            reason = f"surplus: the study already held its target of {self.target:g} trials"
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        try:
            if self.stop.signal:  # claimed as the signal came, before the loop could see it
                raise Interrupted(f"interrupted by {self.stop.signal}; queued for retry")
            self.stop.in_trial = True
            try:
                return self.objective(trial)
            finally:
                self.stop.in_trial = False
        except Interrupted as e:
            trial.set_user_attr("fail_reason", str(e))
            raise

    @staticmethod
    def _refuse_duplicate(trial: optuna.Trial, trials: Sequence[FrozenTrial]) -> None:
        """Fail ``trial``, uncounted, if an earlier trial promotes the same screened one (two
        workers enqueued it at once, see :mod:`autoprune.study.fidelity`)."""
        frozen = trials[trial.number]  # as the tracker just read it
        earlier = duplicate_of(trials, frozen)
        if earlier is not None:
            trial.set_user_attr(SURPLUS_ATTR, True)
            reason = (
                f"{DUPLICATE} of trial {frozen.user_attrs[PROMOTED_ATTR]}: trial {earlier} "
                "promotes it"
            )
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)


def run_worker(
    study: optuna.Study,
    task: Task,
    *,
    target: int | None,
    timeout: float | None = None,
    callbacks: Iterable[Callback] = (),
    poll: float = 1.0,
    stop: _Stop | None = None,
) -> WorkerSummary:
    """The trial loop: run trials of ``study`` (opened by
    :func:`autoprune.study.study.open_study`) as its setup says until it holds ``target``
    counted trials (None: no limit), ``timeout`` seconds pass (no trial starts after), or
    SIGINT or SIGTERM arrive (see the module docstring). ``autoprune search``,
    :func:`autoprune.search` and every worker run trials here. Returns what this worker did.
    ``stop``: the signals noted by :func:`stopping` around a whole command (one that came
    before the loop means it starts no trial); by default, those that come during the loop.

    Raises:
        SpecError: If neither ``target`` nor ``timeout`` is given, or ``target`` < 1.
    """
    if target is None and timeout is None:
        raise SpecError("give a number of trials or a timeout, or the search never ends")
    if target is not None and (isinstance(target, bool) or target < 1):
        raise SpecError(f"the number of trials must be >= 1, got {target!r}")
    limit = math.inf if target is None else target
    inner, ours = objective_for(study, task)
    stop, summary = stop or _Stop(), WorkerSummary(worker_id())
    objective = _WorkerObjective(inner, limit, stop, summary.worker)
    reserve = objective.reserve
    deadline = None if timeout is None else time.monotonic() + timeout

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        summary.states[STATE_WORDS[trial.state]] += 1
        if str(trial.user_attrs.get("fail_reason", "")).startswith("interrupted"):
            resume_later(study, _cleaned(trial))
            summary.retried.append(trial.number)

    with _handling(stop), _quiet_interrupts():
        recover_orphans(study)
        while not stop.signal and _has_work(study, limit, deadline, stop, poll, reserve):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                # One trial at a time: the loop sees a signal and the target before it claims
                # the next one (Optuna's own loop would claim it first).
                study.optimize(
                    objective,
                    n_trials=1,
                    timeout=remaining,
                    catch=(TrialFailed,),
                    callbacks=[*ours, *callbacks, after_trial],
                )
            except optuna.exceptions.UpdateFinishedTrialError as e:
                # Our trial went stale (a heartbeat came too late) and another worker failed
                # and retried it: its result is dropped, the retry will run it again.
                logger.warning("%s; its retry runs it again", e)
    summary.signal = stop.signal
    return summary


def _has_work(
    study: optuna.Study,
    target: float,
    deadline: float | None,
    stop: _Stop,
    poll: float,
    reserve: float = 0.0,
) -> bool:
    """Whether a trial should start: waiting trials, or fewer than ``target`` counted. Else
    waits while trials run that may yet fail and be retried (alive on this machine, or
    watched by heartbeats), so that none is left RUNNING."""
    heartbeat = _optuna.heartbeat_enabled(study)
    while True:
        if stop.signal:  # first: a trial queued again by the signal is not for this worker
            return False
        # One read of the study; the tracker looks at the trials that are new since the last.
        tracker = count_tracker(study, study.get_trials(deepcopy=False), reserve)
        unfinished = tracker.unfinished()
        if any(t.state == TrialState.WAITING for t in unfinished) or tracker.total() < target:
            # Again: a signal that came during the read must not let this worker claim a
            # trial, least of all one that the signal had another worker queue again.
            return not stop.signal
        running = [t for t in unfinished if t.state == TrialState.RUNNING]
        if not heartbeat:
            running = [t for t in running if _host_pid(t) is not None]
        if not running or (deadline is not None and time.monotonic() >= deadline):
            return False
        time.sleep(poll)
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)
        recover_orphans(study)


def recover_orphans(study: optuna.Study, pids: Iterable[int] | None = None) -> list[int]:
    """Fail and retry the RUNNING trials of workers on this machine whose process is gone
    (or, given ``pids``, of those processes). Returns the failed trials' numbers."""
    gone = None if pids is None else set(pids)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = _host_pid(trial)
        if pid is None or (pid not in gone if gone is not None else _alive(pid)):
            continue
        reason = f"worker {trial.user_attrs[WORKER_ATTR]} died during the trial"
        if _fail(study, trial, reason):
            failed_trial = full_trial(study, trial.number)  # whole, as its retry copies it
            assert failed_trial is not None
            retried = _retry(study, failed_trial)
            failed.append(trial.number)
            outcome = "queued for retry" if retried else f"not retried again ({MAX_RETRY} tries)"
            logger.warning("trial %d: %s; %s", trial.number, reason, outcome)
    return failed


def _host_pid(trial: FrozenTrial) -> int | None:
    """The pid of the trial's worker, if that worker runs on this machine."""
    host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fail(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Fail a RUNNING trial from outside its worker; False if it finished meanwhile."""
    # Optuna's own fail_stale_trials does it this way: the state change is atomic in the
    # storage, so of two workers that try, one succeeds.
    storage, trial_id = _optuna.storage_of(study), _optuna.trial_id(trial)
    try:
        storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        return storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _retry(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue ``trial``'s params again with Optuna's retry callback (which records the retry
    history that :func:`counted` reads), unless it used up its retries; whether it did."""
    retry_callback()(study, _cleaned(trial))
    return will_retry(trial)


def _cleaned(trial: FrozenTrial) -> FrozenTrial:
    """``trial`` as its retry starts: without the failure's reason, nor its worker (whose
    process may be gone: another worker would take the claimed retry for an orphan)."""
    clean = copy.deepcopy(trial)
    clean.user_attrs = {
        k: v for k, v in trial.user_attrs.items() if k not in ("fail_reason", WORKER_ATTR)
    }
    return clean


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a failed trial with its traceback; an interrupted one needs none, nor one
    whose storage failed (the search stops with that one-line StorageError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (Interrupted, StorageError)):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def _quiet_interrupts() -> Iterator[None]:
    # On the handlers: a logger's own filters do not see its children's records.
    handlers, quiet = logging.getLogger("optuna").handlers[:], _NoInterruptTraceback()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


@contextmanager
def stopping() -> Iterator[_Stop]:
    """SIGINT and SIGTERM noted for a whole command (``autoprune worker``), for
    :func:`run_worker`'s ``stop``: one that comes while the worker starts means it starts no
    trial; one that comes after its trials, while it reports, changes nothing (it ends
    normally, not killed by the signal, so that its parent does not count it as failed)."""
    stop = _Stop()
    with _handling(stop):
        yield stop


@contextmanager
def _handling(stop: _Stop) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``stop`` (in the main thread; elsewhere signals are left be)."""
    try:
        previous: dict[int, Any] = {s: signal.signal(s, stop.handle) for s in SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def join_study(
    storage: str,
    study_name: str | None,
    *,
    heartbeat: int | None = HEARTBEAT,
    device: str | None = None,
) -> tuple[optuna.Study, StudySetup, Task]:
    """Open a study as a worker that brings no spec file: the study's setup names the task,
    its recipe, space, objectives and everything else. The task is rebuilt here and the
    setup made from it exactly as the study's creator made it, so that a machine that builds
    a different task (dense weights, layers, channel groups) is refused.

    ``device`` is where this worker's trials run (None: the task's own); it is not part of
    the study, so workers on different devices join the same study.

    Raises:
        StorageError: If the storage holds no such study, it is run by another autoprune
            version, its task was given as a Python object (no reference to rebuild it), or
            this machine builds a different task than the study's.
        TaskError: If the study's task does not import or build here, or ``device`` is not
            a device this machine has.
    """
    if device is not None:  # before the task is built, which may take long
        devices.resolve_device(device)
    found = load_study(storage, study_name, wait=True)  # its creator may store the setup now
    name, stored = found.study_name, read_setup(found)
    if stored.version != __version__:
        raise StorageError(
            f"study {name!r} is run by autoprune {stored.version}, this worker is "
            f"autoprune {__version__}; install the same version on every machine (a study of "
            "an older version is carried over by `autoprune search SPEC` on it)"
        )
    if stored.task_ref is None and stored.task not in TASKS:
        raise StorageError(
            f"study {name!r} was given its task as a Python object: workers need a task "
            "reference (search with task='package.module:function')"
        )
    task = study_task(stored)
    if device is not None:
        task = dataclasses.replace(task, device=device)
    setup = make_setup(task, **stored.settings())
    # Each worker samples from its own seed: workers started together must not all draw the
    # same first policies.
    seed = zlib.crc32(f"{stored.seed}:{worker_id()}".encode())
    sampler = make_sampler(stored.sampler or DEFAULT_SAMPLER, seed=seed, space=stored.space)
    try:
        study = open_study(
            setup, task, storage=storage, study_name=name, sampler=sampler, heartbeat=heartbeat
        )
    except StorageError as e:
        raise StorageError(f"this worker differs from the study: {e}") from None
    return study, setup, task
