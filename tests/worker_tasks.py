"""Tasks that worker processes of the tests import by reference (``worker_tasks:tiny``).

Importable from a subprocess whose PYTHONPATH holds this directory. The dense model is
trained on one thread, so that every process builds the same weights (the study's
fingerprint check holds).

A test paces the workers it starts with two environment variables, read where a trial
starts fine-tuning (the task's optimizer is built once per trial, after its policy is drawn
and applied), so that it waits on events instead of on sleeps that must outlast them:

- ``AUTOPRUNE_TEST_GATHER=DIR:N``: each process's first trial waits there until N processes'
  first trials have arrived, so that N workers run trials at once however staggered their
  starts were.
- ``AUTOPRUNE_TEST_HOLD=PATH:K``: each process's trials after its first K wait there while
  the file PATH exists, so that the test can signal or kill a worker in mid-trial. A process
  that waits says so with a file ``PATH.PID`` (see :func:`held`): a signal sent before
  then could land in a storage write, which the worker lets finish, trial and all.

A test sees what a worker process sees with ``AUTOPRUNE_TEST_RECORD=DIR``: each process that
builds a task writes ``DIR/PID``, a JSON object of its ``CUDA_VISIBLE_DEVICES`` (None when
unset) and its command-line arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from conftest import make_resnet_task, make_task
from torch import nn

import autoprune
from autoprune.task import adam

GATHER, HOLD, RECORD = "AUTOPRUNE_TEST_GATHER", "AUTOPRUNE_TEST_HOLD", "AUTOPRUNE_TEST_RECORD"
PARENT = "AUTOPRUNE_TEST_PARENT"
WAIT_LIMIT = 120.0  # seconds; a test that never releases a worker fails instead of hanging
_trials_started = 0  # in this process


def tiny() -> autoprune.Task:
    """The tiny CNN task of conftest (a trial takes a few milliseconds), paced and recorded as
    above."""
    _record()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = make_task()
    finally:
        torch.set_num_threads(threads)
    return dataclasses.replace(task, optimizer=_paced_adam)


def tiny_resnet_task() -> autoprune.Task:
    """The tiny ResNet of conftest (BatchNorm, residual blocks), for structured studies,
    paced as :func:`tiny` is."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = make_resnet_task()
    finally:
        torch.set_num_threads(threads)
    return dataclasses.replace(task, optimizer=_paced_adam)


def parent_only() -> autoprune.Task:
    """The tiny task, built only in the process named by ``AUTOPRUNE_TEST_PARENT``: a
    worker process cannot build it, as on a machine that lacks the user's code."""
    if os.environ.get(PARENT) != str(os.getpid()):
        raise RuntimeError("only the parent process builds this task")
    return tiny()


def _record() -> None:
    if os.environ.get(RECORD):
        seen = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": sys.argv[1:]}
        (Path(os.environ[RECORD]) / str(os.getpid())).write_text(json.dumps(seen))


def _paced_adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    global _trials_started
    _trials_started += 1
    if _trials_started == 1 and os.environ.get(GATHER):
        folder, _, n = os.environ[GATHER].rpartition(":")
        (Path(folder) / str(os.getpid())).touch()
        _wait(lambda: len(os.listdir(folder)) < int(n), f"{n} workers in {folder}")
    if os.environ.get(HOLD):
        path, _, free = os.environ[HOLD].rpartition(":")
        if _trials_started > int(free):
            Path(held(path, os.getpid())).touch()
            _wait(lambda: os.path.exists(path), f"{path} to be removed")
    return adam(params, lr)


def held(path: str | os.PathLike[str], pid: int) -> str:
    """The file whose existence says that process ``pid`` holds a trial at ``path``."""
    return f"{path}.{pid}"


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {WAIT_LIMIT} s for {what}")
        time.sleep(0.01)


def tiny_held_at_start() -> autoprune.Task:
    """The tiny task; a worker process (``autoprune worker``) that builds it first waits while
    the file named by ``AUTOPRUNE_TEST_HOLD`` (``PATH:K``, K unused) exists, saying so with
    ``PATH.PID`` (:func:`held`), so that a test can signal a worker while it starts up."""
    if os.environ.get(HOLD) and sys.argv[1:2] == ["worker"]:
        path = os.environ[HOLD].rpartition(":")[0]
        Path(held(path, os.getpid())).touch()
        _wait(lambda: os.path.exists(path), f"{path} to be removed")
    return tiny()
