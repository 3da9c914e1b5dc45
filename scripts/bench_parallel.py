"""Trials per hour of 1 and of 2 worker processes on digits-cnn, in one run.

Each configuration runs the default digits-cnn study (``studies/digits_cnn.toml``) in its own
study, as ``autoprune search --workers N`` runs it: N ``autoprune worker`` processes with
``cores // N`` torch threads each, sharing one SQLite study with heartbeats. Each runs for
``--window`` seconds (no trial starts after it); its pace is the trials finished between the
first trial's start and the last one's end, so process start-up is not counted against it.
Target: 2 workers at least ``--target`` (1.7) times as fast as one. Exits non-zero when the
target is missed or a trial failed; measure on an otherwise idle machine.

    python scripts/bench_parallel.py [--window 60] [--target 1.7] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoprune.run.parallel import cores, run_workers, threads_per_worker
from autoprune.spec import load_spec
from autoprune.study.study import open_study

SPEC = Path(__file__).resolve().parent.parent / "studies" / "digits_cnn.toml"


@dataclasses.dataclass
class Run:
    workers: int
    threads: int
    finished: int
    failed: int
    seconds: float

    @property
    def per_hour(self) -> float:
        return 3600.0 * self.finished / self.seconds if self.seconds > 0 else 0.0


def run(workers: int, storage: str, window: float) -> Run:
    """One configuration: a fresh study, ``workers`` processes, ``window`` seconds."""
    spec = dataclasses.replace(
        load_spec(SPEC), storage=storage, study_name=f"bench-{workers}", trials=100_000
    )
    task = spec.load_task()
    study = open_study(spec.setup(task), task, storage=storage, study_name=spec.name)
    lines, codes = run_workers(
        study, storage, workers, target=spec.trials, timeout=window, heartbeat=10
    )
    if any(codes):
        raise SystemExit(f"bench_parallel: a worker failed: {lines}")
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    start = min(t.datetime_start.timestamp() for t in trials if t.datetime_start)
    end = max(t.datetime_complete.timestamp() for t in trials if t.datetime_complete)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    return Run(workers, threads_per_worker(workers), len(trials), failed, end - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds per configuration")
    parser.add_argument("--target", type=float, default=1.7, help="least speed-up of 2 workers")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="configurations")
    args = parser.parse_args()
    if args.window <= 0 or 1 not in args.workers:
        parser.error("--window must be positive and --workers must include 1 (the baseline)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/bench.db"
        runs = []
        for n in args.workers:
            began = time.perf_counter()
            runs.append(run(n, storage, args.window))
            print(f"{n} workers: done in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    base = runs[0].per_hour
    print(f"digits-cnn ({SPEC.name}), {cores()} cores, {args.window:.0f} s per configuration")
    print(
        f"{'workers':>8}{'threads':>9}{'trials':>8}{'failed':>8}{'seconds':>9}"
        f"{'trials/h':>10}{'speed-up':>10}"
    )
    for r in runs:
        print(
            f"{r.workers:>8}{r.threads:>9}{r.finished:>8}{r.failed:>8}{r.seconds:>9.1f}"
            f"{r.per_hour:>10.0f}{r.per_hour / base:>9.2f}x"
        )
    errors = [f"{r.workers} workers: {r.failed} trials failed" for r in runs if r.failed]
    errors += [f"{r.workers} workers: only {r.finished} trials" for r in runs if r.finished < 3]
    two = next((r for r in runs if r.workers == 2), None)
    if two is not None and two.per_hour < args.target * base:
        errors.append(
            f"2 workers ran {two.per_hour / base:.2f}x one, under the {args.target}x target"
        )
    for error in errors:
        print(f"bench_parallel: FAIL: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
