"""The commands that run a search and watch it: ``search``, ``worker`` and ``status``.

``status`` only reads the study: what runs trials (torch, the tasks, the trial loop) is
imported by ``search`` and ``worker`` themselves, so that ``status`` starts in a fraction of a
second instead of seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial
from tqdm import tqdm

from autoprune._files import check_output_file, safe_filename
from autoprune.cli._common import (
    DEFAULT_STORAGE,
    create_in_existing_argument,
    front_text,
    positive_int,
    print_counts,
    status_text,
    study_arguments,
)
from autoprune.errors import SpecError
from autoprune.run.status import study_status
from autoprune.study.artifacts import resolve_dir
from autoprune.study.loading import load_study
from autoprune.study.storages import GRACE_FACTOR, HEARTBEAT


class _Progress:
    """Draws the whole study's progress on a tqdm bar, across all its workers: trials done
    of the target, ETA, and complete / failed / stopped, front size and hypervolume.

    Called as an Optuna callback after each trial, or with :meth:`refresh` by a parent that
    watches worker processes.
    """

    # Recounting reads every trial's summary, so the bar is redrawn at most every EVERY
    # seconds, and at most once in SHARE_OF_TIME of the time (at 10,000 trials a recount
    # takes a tenth of a second: the bar then moves every few seconds).
    EVERY = 2.0
    SHARE_OF_TIME = 0.02

    def __init__(self, total: int | None, *, initial: float = 0, disable: bool = False):
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="trial",
            disable=disable,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
            "[{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]",
        )
        self._counted = -math.inf
        self._wait = self.EVERY

    def __call__(self, study: optuna.Study, trial: FrozenTrial | None = None) -> None:
        self.refresh(study)

    def refresh(self, study: optuna.Study, *, force: bool = False) -> None:
        """Recount the study (at most every ``EVERY`` seconds unless ``force``)."""
        now = time.monotonic()
        if self.bar.disable or (not force and now - self._counted < self._wait):
            return
        self._counted = now
        status = study_status(study)
        self._wait = max(self.EVERY, (time.monotonic() - now) / self.SHARE_OF_TIME)
        self.bar.update(max(0, status.progress - self.bar.n))
        hv = "-" if status.hypervolume is None else f"{status.hypervolume:.3f}"
        states = status.states
        self.bar.set_postfix_str(
            f"complete={states['complete']}, failed={states['failed']}, "
            f"stopped={states['stopped']}, front={status.front_size}, hv={hv}"
        )

    def close(self, study: optuna.Study) -> None:
        self.refresh(study, force=True)
        self.bar.close()


def _search(args: argparse.Namespace) -> int:
    from autoprune.devices import release_memory, resolve_device
    from autoprune.report.data import pareto_front
    from autoprune.report.page import write_report
    from autoprune.run.parallel import plan_workers, run_workers
    from autoprune.run.worker import run_worker
    from autoprune.spec import load_spec, parse_duration
    from autoprune.study.setup import read_setup
    from autoprune.study.study import open_study

    spec = load_spec(args.spec)
    if args.device is not None and args.devices is not None:
        raise SpecError("give --device or --devices, not both")
    workers, gpus = plan_workers(args.workers, args.devices)
    # With one GPU per worker, this process measures the dense model on the first of them
    # (and runs the trials there, if it is the only one).
    device = f"cuda:{gpus[0]}" if gpus else args.device
    spec = dataclasses.replace(
        spec,
        trials=args.trials or spec.trials,
        timeout=parse_duration(args.timeout) if args.timeout is not None else spec.timeout,
        storage=args.storage or spec.storage,
        study_name=args.study_name or spec.name,
        device=device or spec.device,
    )
    if spec.device is not None:
        resolve_device(spec.device)  # before the task is built, which may take long
    # Checked before any work; a name derived from the study's stays in this directory.
    report = check_output_file(args.report or safe_filename(spec.name, ".html"))
    task = spec.load_task()
    # Opened (and the task checked) before the bar is drawn: bad input gives one line. The
    # study exists before any worker starts.
    study = open_study(
        spec.setup(task),
        task,
        storage=spec.storage,
        study_name=spec.name,
        heartbeat=args.heartbeat,
        create_in_existing=args.create_in_existing,
    )
    weights_dir = resolve_dir(spec.storage, spec.artifacts)
    dense = read_setup(study).dense
    print(
        f"dense {task.name}: val accuracy {dense['accuracy']:.4f}, test accuracy "
        f"{dense.get('test_accuracy', float('nan')):.4f}, "
        f"{int(dense['nonzero_params'])} prunable weights"
        + "".join(
            f", {name} {dense[name]:.6g}"
            for name in (study.metric_names or [])[1:]
            if name != "nonzero_params" and name in dense
        ),
        flush=True,
    )
    progress = _Progress(spec.trials, initial=study_status(study).progress, disable=args.quiet)
    codes = [0]
    try:
        if workers == 1:
            summary = run_worker(
                study, task, target=spec.trials, timeout=spec.timeout, callbacks=[progress]
            )
            lines = [str(summary)]
        else:
            release_memory(task.torch_device)  # what measuring the dense model left cached
            lines, codes = run_workers(
                study,
                spec.storage,
                workers,
                target=spec.trials,
                timeout=spec.timeout,
                heartbeat=args.heartbeat,
                # A worker on a GPU of its own sees it alone, as cuda:0.
                device="cuda" if gpus else spec.device,
                gpus=gpus,
                on_poll=progress.refresh,
            )
    finally:
        progress.close(study)
    print("\n".join(lines))
    print_counts(study)
    print(front_text(pareto_front(study)))
    out = write_report(study, report)
    print(f"study {spec.name!r} in {spec.storage}")
    if weights_dir is not None:
        print(f"front weights: {_relative(weights_dir)}")
    print(f"report: {out.resolve()}")
    failed = sum(c != 0 for c in codes)
    if failed:
        what = "no worker could run" if failed == len(codes) else f"{failed} workers failed"
        print(f"autoprune: {what} (see the worker lines above)", file=sys.stderr)
    return 1 if any(codes) else 0


def _worker(args: argparse.Namespace) -> int:
    import torch

    from autoprune.run.worker import join_study, run_worker, stopping
    from autoprune.spec import parse_duration

    if args.threads:
        torch.set_num_threads(args.threads)
    # A signal while the worker starts, or after its trials while it reports, ends it normally
    # with its summary: its parent (`search --workers`) forwards one at any time.
    with stopping() as stop:
        study, setup, task = join_study(
            args.storage, args.study_name, heartbeat=args.heartbeat, device=args.device
        )
        target = args.trials or setup.trials
        timeout = parse_duration(args.timeout) if args.timeout is not None else None
        progress = _Progress(target, initial=study_status(study).progress, disable=args.quiet)
        try:
            summary = run_worker(
                study, task, target=target, timeout=timeout, callbacks=[progress], stop=stop
            )
        finally:
            progress.close(study)
        print(summary, flush=True)
        print_counts(study)
    return 0


def _status(args: argparse.Namespace) -> int:
    status = study_status(load_study(args.storage, args.study_name))
    print(status_text(status))
    return 0


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``search``, ``worker`` and ``status`` to the subcommands ``sub``."""
    p = sub.add_parser("search", help="run (or resume) a search from a TOML study spec")
    p.add_argument("spec", help="study spec, e.g. studies/digits_cnn.toml")
    p.add_argument("--storage", help=f"database URL (default: the spec's, else {DEFAULT_STORAGE})")
    p.add_argument("--study-name", help="study name (default: the spec's)")
    p.add_argument(
        "--trials", type=positive_int, help="trials the study holds in the end (its target)"
    )
    p.add_argument("--timeout", help="this run starts no trial after this long: 90, 30m, 8h")
    p.add_argument(
        "--workers",
        type=positive_int,
        help="worker processes (default: one per GPU of --devices, else 1)",
    )
    _device_argument(p, "where trials run, overriding the spec's and the task's")
    p.add_argument(
        "--devices",
        help="one worker per GPU, each seeing only its own: GPU indices as torch numbers them "
        "(0,1,2,3), or all",
    )
    p.add_argument(
        "--report", help="HTML report path (default: STUDY_NAME.html, in the current directory)"
    )
    create_in_existing_argument(p)
    _heartbeat_and_quiet(p)
    p.set_defaults(run=_search)

    p = sub.add_parser("worker", help="join a study that `autoprune search` started")
    p.add_argument("--storage", required=True, help="the study's database URL or journal:PATH")
    p.add_argument("--study-name", help="needed when the storage holds several studies")
    p.add_argument("--trials", type=positive_int, help="target (default: the study's)")
    p.add_argument("--timeout", help="this worker starts no trial after this long")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    _device_argument(p, "where this worker's trials run, overriding the task's")
    _heartbeat_and_quiet(p)
    p.set_defaults(run=_worker)

    p = sub.add_parser("status", help="trials by state, pace, front, workers, stuck trials")
    study_arguments(p)
    p.set_defaults(run=_status)


def _device_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--device",
        help=f"{what}: auto (a GPU when there is one), cpu, cuda, cuda:N or mps",
    )


def _heartbeat_and_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat",
        type=positive_int,
        default=HEARTBEAT,
        help=f"seconds between heartbeats of a running trial (RDB storages; default: "
        f"{HEARTBEAT}); one silent for {GRACE_FACTOR}x as long is failed and retried",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
