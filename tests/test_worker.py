"""Workers in real processes on real databases: budgets, kills, signals, resumes.

The worker processes import ``worker_tasks`` (this directory) by task reference. Trials of
``worker_tasks:tiny`` take milliseconds; a test that must hit a worker in mid-trial holds
its trials there (``AUTOPRUNE_TEST_HOLD``), and one that must see workers run at once
gathers them (``AUTOPRUNE_TEST_GATHER``): it waits on events, not on sleeps.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import new_study
from optuna.trial import FrozenTrial, TrialState
from worker_tasks import GATHER, HOLD, held

from autoprune.cli import main
from autoprune.errors import StorageError, TrialFailed
from autoprune.run.budget import SURPLUS_ATTR, WORKER_ATTR, counted
from autoprune.run.worker import run_worker
from autoprune.spec import spec_from_dict
from autoprune.study.setup import STUDY_ATTR, read_setup
from autoprune.study.space import SearchSpace
from autoprune.study.storages import RESUMES_ATTR, open_storage, resume_later
from autoprune.study.study import open_study
from autoprune.task import Task
from autoprune.tasks import load_task

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# A narrow space, so that tiny trials cost little beyond the sampler and the storage.
SPEC = """\
task = "worker_tasks:{task}"
trials = {trials}

[space]
criteria = ["magnitude", "random"]
scopes = ["layer"]
rules = ["ratio"]

[finetune]
epochs = 1
"""


def env(**extra: str) -> dict[str, str]:
    """The environment of worker processes: this checkout and the test tasks importable, and
    one torch thread unless told otherwise (``--threads``), as in this process (conftest):
    threads that wait on each other make a tiny trial ten times slower on a busy machine."""
    path = os.pathsep.join([str(ROOT), str(TESTS)])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def autoprune(*args: str, cwd: Path, **extra_env: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "autoprune", *args]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def create_study(storage: str, name: str, *, task: str, trials: int) -> optuna.Study:
    """Create the study as ``autoprune search`` does, without running a trial."""
    spec = spec_from_dict({"task": f"worker_tasks:{task}", "trials": trials})
    spec = spec_from_dict({**spec.to_dict(), "storage": storage, "study_name": name})
    loaded = spec.finetune.apply(load_task(spec.task))
    return open_study(spec.setup(loaded), loaded, storage=storage, study_name=name)


def trials_of(storage: str, name: str) -> list[FrozenTrial]:
    """The study's trials; none while the study (or its database) does not exist yet."""
    try:
        opened = open_storage(storage)
    except StorageError:  # no Optuna tables yet: reading does not make them
        return []
    if name not in optuna.get_all_study_names(opened):
        return []
    return optuna.load_study(study_name=name, storage=opened).get_trials(deepcopy=False)


# How long a test waits for a worker's next step before calling it hung. Not a speed
# expectation: under a loaded CI machine starting a worker and running two trials has taken
# over two minutes, so every wait below is on an event, bounded only by this.
HANG = 900


def wait_for(condition: Callable[[], object], seconds: float, what: str) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def held_trial(storage: str, name: str, proc: subprocess.Popen[str], hold: Path) -> FrozenTrial:
    """The trial that worker ``proc`` holds in mid-trial (``AUTOPRUNE_TEST_HOLD``), its
    policy drawn and applied."""
    waiting = lambda: os.path.exists(held(hold, proc.pid)) or proc.poll() is not None  # noqa: E731
    wait_for(waiting, HANG, f"worker {proc.pid} to hold a trial")
    assert proc.poll() is None, proc.communicate()
    tag = f"{socket.gethostname()}:{proc.pid}"
    (trial,) = [
        t
        for t in trials_of(storage, name)
        if t.state == TrialState.RUNNING and t.user_attrs.get(WORKER_ATTR) == tag
    ]
    return trial


def retry_of(trials: list[FrozenTrial], number: int) -> FrozenTrial:
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    return retry


def pg_available() -> bool:
    try:
        return subprocess.run(["pg_isready", "-h", "127.0.0.1"], timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(URL, study name) of a fresh study on each kind of storage; PostgreSQL's is removed
    afterwards, so reruns start clean."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'w.db'}", name
    elif request.param == "journal":
        yield f"journal:{tmp_path / 'w.log'}", name
    else:
        if not pg_available():
            pytest.skip("no PostgreSQL answers `pg_isready -h 127.0.0.1`")
        try:
            yield PG_URL, name
        finally:
            if name in optuna.get_all_study_names(PG_URL):
                optuna.delete_study(study_name=name, storage=PG_URL)


@pytest.mark.slow
def test_four_workers_run_exactly_the_target(
    storage: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 trials: the first 10 drawn at random, the rest by TPE. Every worker's first trial
    waits until all four have one running, so that four run at once to the end, and the
    last slots are raced for."""
    url, name = storage
    (tmp_path / "spec.toml").write_text(SPEC.format(task="tiny", trials=20), encoding="utf-8")
    (tmp_path / "gather").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)  # the workers' working directory too
        mp.setenv("PYTHONPATH", env()["PYTHONPATH"])
        mp.setenv(GATHER, f"{tmp_path / 'gather'}:4")
        code = main(
            ["search", "spec.toml", "--workers", "4", "-q", "--storage", url]
            + ["--study-name", name, "--report", str(tmp_path / "r.html")]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    trials = trials_of(url, name)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 20 == len(counted(trials))
    assert [t.number for t in trials] == list(range(len(trials)))  # unique, none lost
    # Any other trial is a surplus one, started in a race for the last slot and not run.
    assert all(t.user_attrs.get(SURPLUS_ATTR) for t in trials if t not in complete)
    workers = {t.user_attrs[WORKER_ATTR] for t in trials}
    assert len(workers) == 4
    assert out.count("worker ") >= 4 and "complete" in out


STRUCTURED_SPEC = """\
task = "worker_tasks:tiny_resnet_task"
trials = 4
objectives = ["accuracy", "macs", "latency_ms"]

[space]
granularities = ["structured"]
channel_criteria = ["l1", "bn_scale"]
scopes = ["layer"]
rules = ["ratio"]
blocks = ["stages.*.1"]

[latency]
batch_size = 8
repeats = 2
warmup = 0
"""
CONSTRAINED_SPEC = (
    SPEC
    + """
[constraints]
min_accuracy = 0.5

[early_stop]
margin = 0.2
"""
)


def run_search(tmp_path: Path, spec: str, *args: str, **extra_env: str) -> tuple[int, str, str]:
    """``autoprune search spec.toml -q ARGS`` in this process, on a SQLite file in tmp_path;
    returns the exit code, stdout and stderr."""
    (tmp_path / "spec.toml").write_text(spec, encoding="utf-8")
    url = f"sqlite:///{tmp_path / 's.db'}"
    command = ["search", "spec.toml", "-q", "--storage", url, "--study-name", "s", *args]
    capture = subprocess.run(
        [sys.executable, "-m", "autoprune", *command],
        cwd=tmp_path,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    return capture.returncode, capture.stdout, capture.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "objectives"),
    [
        (STRUCTURED_SPEC, ["accuracy", "macs", "latency_ms"]),
        (CONSTRAINED_SPEC.format(task="tiny", trials=4), ["accuracy", "nonzero_params"]),
    ],
    ids=["structured-macs-latency", "constraints-early-stop"],
)
def test_workers_run_every_kind_of_study(tmp_path: Path, spec: str, objectives: list[str]) -> None:
    """The workers join from the stored setup: objectives, latency, channel groups,
    constraints and early stop reach them, and the study gets exactly its target. Both
    workers run a trial: their first trials wait for each other (a late start on a busy
    machine would leave one worker none)."""
    (tmp_path / "gather").mkdir()
    code, out, err = run_search(
        tmp_path, spec, "--workers", "2", **{GATHER: f"{tmp_path / 'gather'}:2"}
    )
    assert code == 0, out + err
    trials = trials_of(f"sqlite:///{tmp_path / 's.db'}", "s")
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 == len(counted(trials))
    assert len({t.user_attrs[WORKER_ATTR] for t in trials}) == 2
    assert out.count("worker ") == 2 and "ended with" not in out
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert study.metric_names == objectives
    setup = read_setup(study)
    if "macs" in objectives:
        assert all(t.user_attrs["policy"]["granularity"] == "structured" for t in finished)
        assert setup.groups and setup.latency is not None
    else:
        assert setup.constraints is not None and setup.constraints.min_accuracy == 0.5
        assert setup.early_stop is not None and setup.early_stop.margin == 0.2
        complete = [t for t in finished if t.state == TrialState.COMPLETE]
        assert all(any(k.startswith("constraints") for k in t.system_attrs) for t in complete)


@pytest.mark.slow
def test_workers_that_cannot_run_fail_the_search_loudly(tmp_path: Path) -> None:
    """The parent builds the task, its workers cannot: the search says so and exits 1."""
    spec = SPEC.format(task="parent_only", trials=2)
    (tmp_path / "spec.toml").write_text(spec, encoding="utf-8")
    url = f"sqlite:///{tmp_path / 's.db'}"
    command = [sys.executable, "-c", PARENT_MAIN, "spec.toml", url]
    capture = subprocess.run(
        command, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=HANG
    )
    assert capture.returncode == 1, capture.stdout + capture.stderr
    lines = [line for line in capture.stdout.splitlines() if line.startswith("worker pid")]
    assert len(lines) == 2
    for line in lines:
        assert "ended with exit code 2" in line
        assert "only the parent process builds this task" in line
    assert "no worker could run" in capture.stderr
    assert all(t.state == TrialState.WAITING for t in trials_of(url, "s"))  # warm starts


# The parent of the test above: it may build worker_tasks:parent_only, its workers may not.
PARENT_MAIN = """
import os, sys
os.environ["AUTOPRUNE_TEST_PARENT"] = str(os.getpid())
from autoprune.cli import main
spec, url = sys.argv[1:]
sys.exit(main(["search", spec, "-q", "--workers", "2", "--storage", url, "--study-name", "s"]))
"""


@pytest.mark.slow
def test_a_killed_worker_s_trial_fails_and_is_retried(tmp_path: Path) -> None:
    """The survivor completes one trial, then both workers' trials are held in mid-trial
    until the victim is killed."""
    url, name = f"sqlite:///{tmp_path / 'k.db'}", "kill"
    create_study(url, name, task="tiny", trials=3)
    hold = tmp_path / "hold"
    hold.touch()
    args = ["worker", "--storage", url, "--study-name", name, "--heartbeat", "1", "-q"]
    victim = autoprune(*args, cwd=tmp_path, **{HOLD: f"{hold}:0"})
    survivor = autoprune(*args, cwd=tmp_path, **{HOLD: f"{hold}:1"})
    try:
        hit = held_trial(url, name, victim, hold)
        held_trial(url, name, survivor, hold)  # after its first trial
        before = {t.number: t.values for t in trials_of(url, name) if t.values is not None}
        assert len(before) == 1
        victim.kill()
        victim.wait()
        hold.unlink()
        out, err = survivor.communicate(timeout=HANG)
    finally:
        for proc in (victim, survivor):
            proc.kill()
    assert survivor.returncode == 0, err
    trials = trials_of(url, name)
    assert trials[hit.number].state == TrialState.FAIL
    retry = retry_of(trials, hit.number)
    # The same policy again.
    assert retry.state == TrialState.COMPLETE and retry.params == hit.params
    assert all(trials[n].values == values for n, values in before.items())  # all kept
    assert [t.state for t in counted(trials)] == [TrialState.COMPLETE] * 3
    assert "3 complete" in out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_stale_heartbeat_is_failed_and_retried(tiny_task: Task, tmp_path: Path) -> None:
    """A trial of a worker lost on another machine: one heartbeat, then silence for longer
    than the grace period (3 heartbeats of 1 s). The next worker fails and retries it."""
    storage = open_storage(f"sqlite:///{tmp_path / 'h.db'}", for_writing=True, heartbeat=1)
    study = new_study(tiny_task, space=SearchSpace(), storage=storage, study_name="h")
    lost = study.ask()
    lost.set_user_attr(WORKER_ATTR, "elsewhere:1")  # not this machine: no pid to look at
    storage.record_heartbeat(lost._trial_id)
    time.sleep(3.5)
    summary = run_worker(study, tiny_task, target=3)
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL
    assert retry_of(trials, 0).state == TrialState.COMPLETE
    assert [t.state for t in counted(trials)] == [TrialState.COMPLETE] * 3
    assert summary.states == {"complete": 3}


@pytest.mark.slow
def test_sigterm_fails_the_running_trial_and_exits_cleanly(tmp_path: Path) -> None:
    url, name = f"sqlite:///{tmp_path / 't.db'}", "term"
    create_study(url, name, task="tiny", trials=5)
    hold = tmp_path / "hold"
    hold.touch()  # the first trial waits in mid-trial for the signal
    args = ["worker", "--storage", url, "--study-name", name, "-q"]
    worker = autoprune(*args, cwd=tmp_path, **{HOLD: f"{hold}:0"})
    try:
        hit = held_trial(url, name, worker, hold)
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=HANG)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert "stopped by SIGTERM" in out and f"trial {hit.number} queued for retry" in out
    assert "Traceback" not in err
    trials = trials_of(url, name)
    failed = trials[hit.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("interrupted by SIGTERM")
    retry = resumption_of(trials, hit.number)
    assert retry.state == TrialState.WAITING and "fail_reason" not in retry.user_attrs
    assert retry.params == hit.params and "retry_history" not in retry.system_attrs
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_resume_after_a_crash_on_a_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A journal has no heartbeats: the resume on the same machine sees the dead pid. The
    first run completes two trials; its third is held in mid-trial until it is killed."""
    url = f"journal:{tmp_path / 'j.log'}"
    (tmp_path / "spec.toml").write_text(SPEC.format(task="tiny", trials=4), encoding="utf-8")
    args = ["search", "spec.toml", "-q", "--storage", url, "--study-name", "j"]
    hold = tmp_path / "hold"
    hold.touch()
    first = autoprune(*args, cwd=tmp_path, **{HOLD: f"{hold}:2"})
    try:
        hit = held_trial(url, "j", first, hold)
        first.kill()
        first.wait()
    finally:
        first.kill()
    hold.unlink()
    before = {t.number: t.values for t in trials_of(url, "j") if t.values is not None}
    assert len(before) == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        mp.setenv("PYTHONPATH", env()["PYTHONPATH"])
        assert main([*args, "--report", str(tmp_path / "r.html")]) == 0
    trials = trials_of(url, "j")
    assert trials[hit.number].state == TrialState.FAIL
    assert "died during the trial" in trials[hit.number].user_attrs["fail_reason"]
    assert retry_of(trials, hit.number).state == TrialState.COMPLETE
    assert all(trials[n].values == values for n, values in before.items())
    # The budget counted the completed trials: 4 in all, not 4 more.
    assert [t.state for t in counted(trials)] == [TrialState.COMPLETE] * 4
    assert STUDY_ATTR in optuna.load_study(study_name="j", storage=open_storage(url)).user_attrs
    capsys.readouterr()


def in_process_study(task: Task, tmp_path: Path, target: int) -> optuna.Study:
    return new_study(
        task,
        space=SearchSpace(),
        storage=f"sqlite:///{tmp_path / 'p.db'}",
        study_name="p",
        trials=target,
        task_ref="worker_tasks:tiny",
    )


@pytest.mark.slow
def test_the_target_is_the_study_s_total(tiny_task: Task, tmp_path: Path) -> None:
    study = in_process_study(tiny_task, tmp_path, 3)
    assert run_worker(study, tiny_task, target=3).states == {"complete": 3}
    assert run_worker(study, tiny_task, target=3).states == {}  # a resume at the target
    assert run_worker(study, tiny_task, target=5).states == {"complete": 2}
    assert [t.number for t in study.trials] == list(range(5))


def test_counted_leaves_out_retried_and_surplus_trials() -> None:
    make = optuna.trial.create_trial
    trials = [
        make(state=TrialState.COMPLETE, values=[0.9, 10.0]),
        make(state=TrialState.FAIL),  # lost, then retried by 2
        make(state=TrialState.WAITING, system_attrs={"failed_trial": 1, "retry_history": [1]}),
        make(state=TrialState.FAIL, user_attrs={"fail_reason": "nan loss"}),  # counts
        make(state=TrialState.FAIL, user_attrs={SURPLUS_ATTR: True}),
    ]
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials(trials)
    assert [t.number for t in counted(study.trials)] == [0, 2, 3]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_a_trial_past_the_target_is_surplus_and_not_run(tiny_task: Task, tmp_path) -> None:
    from autoprune.run.worker import _Stop, _WorkerObjective
    from autoprune.study.objective import Objective

    study = in_process_study(tiny_task, tmp_path, 1)
    objective = Objective(tiny_task, SearchSpace(), read_setup(study).layers)
    wrapped = _WorkerObjective(objective, 1, _Stop(), "here:1")
    study.ask()  # another worker's trial 0 takes the one slot
    late = study.ask()
    with pytest.raises(TrialFailed, match="surplus: the study already held its target of 1"):
        wrapped(late)
    attrs = study.trials[late.number].user_attrs
    assert attrs[SURPLUS_ATTR] is True and "policy" not in attrs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "0.0.1"}, "is run by autoprune 0.0.1, this worker is autoprune"),
        (
            {"model": "0" * 16},
            "this worker differs from the study: study 'r' was created with "
            "dense model weights (fingerprint) '0000000000000000'",
        ),
        (
            {"task_ref": None},
            "study 'r' was given its task as a Python object: workers need a task reference",
        ),
    ],
)
def test_a_worker_that_differs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    study = create_study(url, "r", task="tiny", trials=2)
    study.set_user_attr(STUDY_ATTR, {**read_setup(study).to_dict(), **change})
    code = main(["worker", "--storage", url, "--study-name", "r", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    trials = optuna.load_study(study_name="r", storage=url).trials
    assert all(t.state == TrialState.WAITING for t in trials)  # the warm start: none ran


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_recover_orphans_fails_and_retries_trials_of_dead_local_workers(
    tiny_task: Task, tmp_path: Path
) -> None:
    from autoprune.run.worker import recover_orphans

    study = in_process_study(tiny_task, tmp_path, 5)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now
    host = socket.gethostname()
    tags = [f"{host}:{dead.pid}", f"{host}:{os.getpid()}", "elsewhere:1", f"{host}:999999"]
    for tag in tags:
        study.ask().set_user_attr(WORKER_ATTR, tag)
    # A parent told which worker died recovers that worker's trial only.
    assert recover_orphans(study, pids=[999999]) == [3]
    # Without pids: every local worker whose process is gone; this one lives, "elsewhere"
    # may (it is not ours to judge).
    assert recover_orphans(study) == [0]
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials[:4]] == [
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.RUNNING,
        TrialState.FAIL,
    ]
    assert trials[0].user_attrs["fail_reason"] == f"worker {tags[0]} died during the trial"
    assert {retry_of(trials, 0).state, retry_of(trials, 3).state} == {TrialState.WAITING}


def start_search(tmp_path: Path, url: str, **extra_env: str) -> subprocess.Popen[str]:
    """``autoprune search spec.toml --workers 2`` in a process of its own, on study "sig"."""
    args = ["search", "spec.toml", "-q", "--workers", "2", "--storage", url]
    args += ["--study-name", "sig", "--report", str(tmp_path / "r.html")]
    return autoprune(*args, cwd=tmp_path, **extra_env)


def term_while_held(
    tmp_path: Path, url: str, hold: Path, free: int, complete: int
) -> tuple[FrozenTrial, str, str, datetime.datetime]:
    """Start a 2-worker search whose workers hold their trials after the first ``free``
    (``AUTOPRUNE_TEST_HOLD``); once one worker holds a trial and ``complete`` trials are
    complete (the other worker has nothing left to start), SIGTERM the parent. Returns the
    held trial, the parent's stdout and stderr, and when the signal was sent (local time, as
    Optuna's trial times)."""
    hold.touch()
    parent = start_search(tmp_path, url, **{HOLD: f"{hold}:{free}"})
    try:

        def one_held() -> list[Path]:
            assert parent.poll() is None, parent.communicate()
            done = [t for t in trials_of(url, "sig") if t.state == TrialState.COMPLETE]
            found = list(tmp_path.glob(f"{hold.name}.*"))
            return found if len(done) == complete and found else []

        (marker,) = wait_for(one_held, HANG, "a worker to hold a trial")  # type: ignore[misc]
        pid = int(marker.name.rpartition(".")[2])
        tag = f"{socket.gethostname()}:{pid}"
        (hit,) = [
            t
            for t in trials_of(url, "sig")
            if t.state == TrialState.RUNNING and t.user_attrs.get(WORKER_ATTR) == tag
        ]
        signalled = datetime.datetime.now()
        parent.send_signal(signal.SIGTERM)
        out, err = parent.communicate(timeout=HANG)
    finally:
        parent.kill()
        hold.unlink(missing_ok=True)
    assert parent.returncode == 0, out + err
    assert "Traceback" not in err and "failed" not in err, err
    return hit, out, err, signalled


def resumption_of(trials: list[FrozenTrial], number: int) -> FrozenTrial:
    (again,) = [t for t in trials if t.user_attrs.get(RESUMES_ATTR) == number]
    return again


def resume_to_the_target(tmp_path: Path, url: str, hit: FrozenTrial, target: int) -> None:
    code = subprocess.run(
        [sys.executable, "-m", "autoprune", "search", "spec.toml", "-q", "--workers", "2"]
        + ["--storage", url, "--study-name", "sig", "--report", str(tmp_path / "r.html")],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert code.returncode == 0, code.stdout + code.stderr
    trials = trials_of(url, "sig")
    assert [t.state for t in counted(trials)] == [TrialState.COMPLETE] * target
    again = [t for t in counted(trials) if t.params == hit.params and t.number >= hit.number]
    assert len(again) == 1  # the interrupted policy ran to the end, once


@pytest.mark.slow
def test_sigterm_retries_the_held_trial_once_and_the_idle_worker_claims_nothing(
    tmp_path: Path,
) -> None:
    """One worker holds the last trial of 3, the other has nothing left to start and waits
    for it. One SIGTERM to the parent: one retry of the held trial, which no worker claims
    after the signal; a resume reaches the target exactly."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    (tmp_path / "spec.toml").write_text(SPEC.format(task="tiny", trials=3), encoding="utf-8")
    hit, out, _, signalled = term_while_held(tmp_path, url, tmp_path / "hold", free=1, complete=2)
    assert out.count("stopped by SIGTERM") == 2, out
    assert out.count("queued for retry") == 1 and f"trial {hit.number} queued for retry" in out
    trials = trials_of(url, "sig")
    again = resumption_of(trials, hit.number)
    assert again.state == TrialState.WAITING and again.params == hit.params
    # When both workers asked for the last trial at once, before the signal, one refused its
    # trial, unrun, as surplus (seen once in 20 rounds of the race loop under load).
    surplus = [t for t in trials if t.user_attrs.get(SURPLUS_ATTR)]
    assert all(t.state == TrialState.FAIL and t.datetime_start < signalled for t in surplus)
    failed = [t.number for t in trials if t.state == TrialState.FAIL and t not in surplus]
    assert failed == [hit.number]
    assert again == trials[-1] and len(trials) == 4 + len(surplus)  # nothing after the signal
    assert len(counted(trials)) == 3
    resume_to_the_target(tmp_path, url, hit, 3)
    # The resume's two workers race for the one waiting retry: the one that loses may have
    # asked for a new trial already, which it refuses, unrun and uncounted, as surplus
    # (seen once in 10 rounds under load). Nothing else is added.
    extra = trials_of(url, "sig")[len(trials) :]
    assert all(t.state == TrialState.FAIL and t.user_attrs.get(SURPLUS_ATTR) for t in extra)
    assert all(t.values is None and "policy" not in t.user_attrs for t in extra)


@pytest.mark.slow
def test_two_sigterms_in_two_runs_still_retry_the_policy(tmp_path: Path) -> None:
    """The held trial is interrupted, then its retry too: the policy is queued again each
    time and a third run reaches the target with it."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    (tmp_path / "spec.toml").write_text(SPEC.format(task="tiny", trials=3), encoding="utf-8")
    hit, _, _, _ = term_while_held(tmp_path, url, tmp_path / "hold", free=1, complete=2)
    again = resumption_of(trials_of(url, "sig"), hit.number)
    second, out, _, _ = term_while_held(tmp_path, url, tmp_path / "hold2", free=0, complete=2)
    assert second.number == again.number and second.params == hit.params
    assert f"trial {second.number} queued for retry" in out
    trials = trials_of(url, "sig")
    assert resumption_of(trials, second.number).state == TrialState.WAITING
    assert len(counted(trials)) == 3
    resume_to_the_target(tmp_path, url, hit, 3)


@pytest.mark.slow
def test_sigterm_with_nothing_left_to_do_ends_the_search_normally(tmp_path: Path) -> None:
    """The study holds its target; a second search's workers are signalled while they start
    (as a terminal's Ctrl-C reaches them, and the parent forwards it): exit 0, each worker's
    summary, no trial started."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = SPEC.format(task="tiny_held_at_start", trials=2)
    (tmp_path / "spec.toml").write_text(spec, encoding="utf-8")
    first = start_search(tmp_path, url)
    assert first.wait(timeout=HANG) == 0, first.communicate()
    before = trials_of(url, "sig")
    hold = tmp_path / "hold"
    hold.touch()
    parent = start_search(tmp_path, url, **{HOLD: f"{hold}:0"})
    try:
        found = lambda: len(list(tmp_path.glob("hold.*"))) == 2 or parent.poll() is not None  # noqa: E731
        wait_for(found, HANG, "both workers to start")
        assert parent.poll() is None, parent.communicate()
        pids = [int(p.name.rpartition(".")[2]) for p in tmp_path.glob("hold.*")]
        parent.send_signal(signal.SIGTERM)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        hold.unlink()
        out, err = parent.communicate(timeout=HANG)
    finally:
        parent.kill()
    assert parent.returncode == 0, out + err
    assert "failed" not in err and "abnormal" not in err and "ended with" not in out, out + err
    assert out.count("stopped by SIGTERM") == 2, out
    assert len(trials_of(url, "sig")) == len(before)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_interruptions_do_not_use_up_the_crash_retries(tiny_task: Task, tmp_path: Path) -> None:
    """A policy interrupted more often than a crashing one may be retried is still queued
    again each time, and runs when the signals stop."""
    from dataclasses import replace

    from autoprune.study.storages import MAX_RETRY
    from autoprune.task import adam

    def interrupted(params, lr):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGTERM)  # as if sent to the worker in mid-trial
        return adam(params, lr)

    study = in_process_study(tiny_task, tmp_path, 1)
    numbers = []
    for _ in range(MAX_RETRY + 2):
        summary = run_worker(study, replace(tiny_task, optimizer=interrupted), target=1)
        assert summary.signal == "SIGTERM" and len(summary.retried) == 1
        numbers += summary.retried
    assert numbers == list(range(MAX_RETRY + 2))
    assert run_worker(study, tiny_task, target=1).states == {"complete": 1}
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in counted(trials)] == [MAX_RETRY + 2]
    assert trials[-1].state == TrialState.COMPLETE and trials[-1].params == trials[0].params


def test_a_signal_that_comes_as_the_worker_reads_the_study_claims_nothing(
    tiny_task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study holds its target and this worker waits for nothing; as it reads the study,
    another worker stopped by the same signal queues its interrupted trial again, and the
    signal reaches this worker too. It claims nothing: a trial it claimed now would fail at
    once, one more failed trial in the study (and one more resumption)."""
    study = in_process_study(tiny_task, tmp_path, 1)
    assert run_worker(study, tiny_task, target=1).states == {"complete": 1}
    reads = study.get_trials
    fired = []

    def reading(*args: Any, **kwargs: Any) -> list[FrozenTrial]:
        if sys._getframe(1).f_code.co_name == "_has_work" and not fired:
            fired.append(True)
            resume_later(study, study.trials[0])  # as the other worker does
            os.kill(os.getpid(), signal.SIGTERM)
        return reads(*args, **kwargs)

    monkeypatch.setattr(study, "get_trials", reading)
    summary = run_worker(study, tiny_task, target=1)
    assert fired and summary.signal == "SIGTERM"
    assert summary.states == {} and summary.retried == []
    assert [t.state for t in reads()] == [TrialState.COMPLETE, TrialState.WAITING]


def test_the_parent_signals_all_its_workers_at_once(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The workers share a process group of their own, which the parent's signal reaches in
    one call: signalled one by one, a worker signalled first could queue its interrupted
    trial again before the next heard of the signal, and that one would claim it."""
    import types

    from autoprune.run import parallel

    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    monkeypatch.setattr(parallel, "worker_command", lambda *args, **kwargs: sleeper)

    def one_by_one(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a worker was signalled alone")

    monkeypatch.setattr(subprocess.Popen, "send_signal", one_by_one)
    groups = []

    def stop(proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # not proc.kill(): send_signal is patched
            proc.wait()

    def watch(study: Any, procs: list[subprocess.Popen[str]], *args: Any) -> None:
        request.addfinalizer(lambda: [stop(proc) for proc in procs])  # if the test fails
        groups.extend(os.getpgid(proc.pid) for proc in procs)
        os.kill(os.getpid(), signal.SIGTERM)  # to the parent, as `kill` or a scheduler does
        for proc in procs:
            proc.wait(timeout=HANG)

    monkeypatch.setattr(parallel, "_watch", watch)
    previous = signal.signal(signal.SIGTERM, lambda *args: None)  # unforwarded: not fatal here
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    study = types.SimpleNamespace(study_name="s")
    lines, codes = parallel.run_workers(study, "sqlite://", 3, target=1, heartbeat=1)  # type: ignore[arg-type]
    assert len(set(groups)) == 1 and groups[0] != os.getpgrp()
    assert codes == [0, 0, 0]
    assert all("stopped by signal SIGTERM" in line for line in lines), lines


def test_a_worker_killed_by_the_forwarded_signal_was_stopped_not_failed(tmp_path: Path) -> None:
    """A worker signalled while Python still starts (before it can note signals) dies of the
    signal: the parent that forwarded it counts it as stopped; one it did not forward, failed."""
    from autoprune.run.parallel import _stopped, _summary

    dies = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    proc = subprocess.Popen([sys.executable, "-c", dies], stdout=subprocess.PIPE, text=True)
    proc.wait()
    with open(tmp_path / "log", "w+", encoding="utf-8") as log:
        assert _stopped(proc, True) and not _stopped(proc, False)
        assert "stopped by signal SIGTERM" in _summary(proc, log, True)
        assert "ended with signal SIGTERM" in _summary(proc, log, False)
