"""N worker processes on one machine sharing one study (``autoprune search --workers N``).

The study is created (and the dense model trained) once, by the caller, before any worker
starts: workers that create a new SQLite database together race on its tables. Each worker
is a separate ``python -m autoprune worker`` process that joins the study by name, with
``cores // N`` torch threads. The parent watches: it fails and retries at once the trial of
a worker that dies (see :func:`autoprune.run.worker.recover_orphans`), forwards SIGINT/SIGTERM to
the workers and waits for them, and draws the study's progress.

One worker per GPU (``--devices 0,1,2,3`` or ``--devices all``, see :func:`plan_workers`):
each worker's ``CUDA_VISIBLE_DEVICES`` names its own GPU only, so that it sees that one GPU
(as ``cuda:0``) and nothing it does can touch another's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

import optuna
import torch

from autoprune.errors import SpecError
from autoprune.run.worker import SIGNALS, recover_orphans

logger = logging.getLogger(__name__)


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` processes: the cores split between them."""
    return max(1, cores() // workers)


def visible_gpus() -> int:
    """CUDA GPUs torch sees in this process (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(text: str) -> list[int]:
    """The GPUs named by ``text``: ``"all"`` (every GPU torch sees) or indices separated by
    commas (``"0,1,2,3"``), numbered as torch numbers them in this process.

    Raises:
        SpecError: If ``text`` is neither, names a GPU twice, or names a GPU that torch does
            not see here (or there is none).
    """
    count = visible_gpus()
    if text.strip() == "all":
        if count == 0:
            raise SpecError("devices 'all': torch sees no CUDA GPU here")
        return list(range(count))
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise SpecError(
            f"devices must be 'all' or GPU indices separated by commas (0,1,2,3), got {text!r}"
        )
    gpus = [int(part) for part in parts]
    twice = next((gpu for gpu in gpus if gpus.count(gpu) > 1), None)
    if twice is not None:
        raise SpecError(f"devices {text!r} name GPU {twice} twice (one worker per GPU)")
    if count == 0:
        raise SpecError(f"devices {text!r}: torch sees no CUDA GPU here")
    beyond = next((gpu for gpu in gpus if gpu >= count), None)
    if beyond is not None:
        raise SpecError(
            f"devices {text!r} name GPU {beyond}, but torch sees {count} GPU(s) here "
            f"(0 to {count - 1})"
        )
    return gpus


def plan_workers(workers: int | None, devices: str | None) -> tuple[int, list[int] | None]:
    """The number of worker processes of a run, and each one's GPU (None: no GPU of its own).

    Args:
        workers: Worker processes; None: one per GPU of ``devices``, else 1.
        devices: GPUs, one worker each (see :func:`parse_gpus`); None: the workers share
            the device the task names.

    Raises:
        SpecError: If ``workers`` is not an integer >= 1, ``devices`` is bad (see
            :func:`parse_gpus`), or the two give different numbers of workers.
    """
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise SpecError(f"workers must be an integer >= 1, got {workers!r}")
    if devices is None:
        return workers or 1, None
    gpus = parse_gpus(devices)
    if workers is not None and workers != len(gpus):
        raise SpecError(
            f"{workers} workers on devices {devices!r} ({len(gpus)} GPUs): one worker runs per "
            "GPU (leave the number of workers out)"
        )
    return len(gpus), gpus


def gpu_environment(gpu: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment (``environ``, default this process's) of a worker that sees only GPU
    ``gpu`` (torch's index here): ``CUDA_VISIBLE_DEVICES`` names that GPU alone, as this
    process's own ``CUDA_VISIBLE_DEVICES`` names it if it has one."""
    environ = dict(os.environ if environ is None else environ)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in visible.split(",")] if visible else []
    environ["CUDA_VISIBLE_DEVICES"] = names[gpu] if gpu < len(names) else str(gpu)
    return environ


def worker_command(
    storage: str,
    study_name: str,
    *,
    target: int,
    timeout: float | None,
    threads: int,
    heartbeat: int,
    device: str | None = None,
) -> list[str]:
    """The command line of one worker process (``device``: its ``--device``, if any)."""
    command = [sys.executable, "-m", "autoprune", "worker", "--storage", storage]
    command += ["--study-name", study_name, "--trials", str(target), "--threads", str(threads)]
    command += ["--heartbeat", str(heartbeat), "--quiet"]
    if timeout is not None:
        command += ["--timeout", f"{max(timeout, 1.0):.3f}"]
    if device is not None:
        command += ["--device", device]
    return command


def run_workers(
    study: optuna.Study,
    storage: str,
    workers: int,
    *,
    target: int,
    timeout: float | None = None,
    heartbeat: int,
    device: str | None = None,
    gpus: Sequence[int] | None = None,
    on_poll: Callable[[optuna.Study], None] = lambda study: None,
    poll: float = 1.0,
) -> tuple[list[str], list[int]]:
    """Run ``workers`` worker processes on ``study`` until all have ended.

    Args:
        device: Each worker's ``--device``; None: the task's own.
        gpus: One GPU per worker (torch's indices here, see :func:`plan_workers`): each
            worker sees that GPU only; None: the workers see what this process sees.

    Returns each worker's summary line (or how it ended, if it printed none) and exit codes;
    a worker killed by the signal forwarded to it (while Python started, before it could note
    signals) was stopped, not failed: its code is 0.

    Raises:
        SpecError: If ``gpus`` does not hold one GPU per worker.
    """
    if gpus is not None and len(gpus) != workers:
        raise SpecError(f"{workers} workers need one GPU each, got {list(gpus)}")
    command = worker_command(
        storage,
        study.study_name,
        target=target,
        timeout=timeout,
        threads=threads_per_worker(workers),
        heartbeat=heartbeat,
        device=device,
    )
    environments = [None] * workers if gpus is None else [gpu_environment(g) for g in gpus]
    # A worker's log goes to a file, not a pipe that a long run would fill: its last line is
    # the one-line error of a worker that could not run.
    with contextlib.ExitStack() as files, _forwarding() as forward:
        logs = [
            files.enter_context(tempfile.TemporaryFile(mode="w+", encoding="utf-8"))
            for _ in range(workers)
        ]
        procs = forward.procs
        for log, env in zip(logs, environments, strict=True):
            procs.append(
                subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    env=env,
                    process_group=procs[0].pid if procs else 0,
                )
            )
        if forward.sent:  # a signal came while they started: it reaches all of them now
            forward.send()
        logger.info("started %d workers (pids %s)", workers, ", ".join(str(p.pid) for p in procs))
        _watch(study, procs, on_poll, poll)
        lines = [_summary(proc, log, forward.sent) for proc, log in zip(procs, logs, strict=True)]
    if gpus is not None:
        lines = [f"{line} [GPU {gpu}]" for line, gpu in zip(lines, gpus, strict=True)]
    return lines, [0 if _stopped(proc, forward.sent) else proc.returncode for proc in procs]


class _Forward:
    """The parent's SIGINT/SIGTERM, forwarded to its workers as SIGTERM, to all at once.

    The workers share a process group of their own, and one ``killpg`` signals them all:
    signalled one by one, a worker signalled first could queue its interrupted trial again
    before the next one heard of the signal, and that one would claim it (and fail it). A
    terminal's Ctrl-C reaches only the parent (the workers are not in its process group),
    which forwards it.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.sent = False

    def __call__(self, signum: int, _frame: Any) -> None:
        if not self.sent:
            self.sent = True
            self.send()

    def send(self) -> None:
        # While one of them runs, their group exists (and its id is no other group's).
        if any(proc.poll() is None for proc in self.procs):
            with contextlib.suppress(ProcessLookupError):  # all ended meanwhile
                os.killpg(self.procs[0].pid, signal.SIGTERM)


@contextlib.contextmanager
def _forwarding() -> Iterator[_Forward]:
    """SIGINT and SIGTERM go to a :class:`_Forward`, from before the first worker starts."""
    forward = _Forward()
    previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        yield forward
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _watch(
    study: optuna.Study,
    procs: list[subprocess.Popen[str]],
    on_poll: Callable[[optuna.Study], None],
    poll: float,
) -> None:
    """Wait for ``procs`` to end, and fail and retry at once the trial of one that dies."""
    ended: set[int] = set()
    while len(ended) < len(procs):
        time.sleep(poll)
        for proc in procs:
            if proc.pid not in ended and proc.poll() is not None:
                ended.add(proc.pid)
                if proc.returncode != 0:  # killed: its trial must not stay RUNNING
                    recover_orphans(study, pids=[proc.pid])
        on_poll(study)


def _stopped(proc: subprocess.Popen[str], forwarded: bool) -> bool:
    """Whether ``proc`` ended by the signal forwarded to it (or a terminal's Ctrl-C)."""
    return forwarded and proc.returncode in (-signal.SIGTERM, -signal.SIGINT)


def _summary(proc: subprocess.Popen[str], log: IO[str], forwarded: bool = False) -> str:
    """The worker's own summary line; for one that failed, how it ended and its last words."""
    out = (proc.stdout.read() if proc.stdout else "").strip().splitlines()
    summary = next((line for line in out if line.startswith("worker ")), None)
    if summary is not None and proc.returncode == 0:
        return summary
    if _stopped(proc, forwarded):
        return f"worker pid {proc.pid}: stopped by {_how(proc.returncode)} before it could report"
    summary = f"worker pid {proc.pid}: ended with {_how(proc.returncode)}"
    error = _last_line(log)
    return f"{summary}: {error}" if error else summary


def _last_line(log: IO[str]) -> str:
    log.seek(0)
    lines = [line.strip() for line in log.read().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _how(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"
