"""What a trial's storage costs on SQLite, with and without BEGIN IMMEDIATE and WAL.

Runs the same short study of digits-cnn as ``autoprune search`` runs it (front weights and the
``autoprune_front`` table included) in a fresh SQLite file, under each storage setup:

- ``current``: what autoprune does (WAL, synchronous=NORMAL, every transaction BEGIN IMMEDIATE);
- ``deferred``: WAL, synchronous=NORMAL, pysqlite's own deferred transactions (autoprune before
  BEGIN IMMEDIATE);
- ``nowal-immediate``: SQLite's rollback journal and synchronous=FULL, BEGIN IMMEDIATE;
- ``nowal-deferred``: plain Optuna on SQLite;
- ``memory``: Optuna's in-memory storage, the floor (no weights, no table).

The setups are patched in here (the pragma and begin hooks of autoprune's SQLite storage), not
in the library. Each trial's time is split by who spends it: Optuna's storage calls made by
``study.optimize`` and the objective (by method), the sampler (its reads included), the weights
upload (objective hook), the weights and front-table callbacks (their reads included), and the
rest (the model). The BEGIN IMMEDIATE statements are also timed alone, in the trial's thread
and in the heartbeat's (waits for the lock included; in deferred setups the first write of a
transaction takes that lock instead). Every SQL statement and transaction is counted where it
is issued. Trial 0 (the warm-up) is left out; the setups take turns, ``--repeat`` times, and
each cell is the median over the repeats with the range beside it.

``--prefill N`` first adds N synthetic trials shaped like digits-cnn's (see bench_report.py), to
show what grows with the study.

    python scripts/bench_storage.py [--trials 10] [--repeat 3] [--setups current,deferred]
                                    [--prefill 500]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any

import optuna
import sqlalchemy
import torch
from bench_trial import Ledger as TrialLedger  # this script's folder is on sys.path

from autoprune.study import storages
from autoprune.study.artifacts import ArtifactSpec, FrontWeights, rdb_storage
from autoprune.study.front_table import FrontTable
from autoprune.study.setup import make_setup
from autoprune.study.space import SearchSpace
from autoprune.study.study import objective_for, open_study
from autoprune.tasks import load_task

SETUPS = ("current", "deferred", "nowal-immediate", "nowal-deferred", "memory")
COLUMNS = ("storage", "sampler", "upload", "weights cb", "front table", "model+rest", "wall")
# Also shown: the BEGIN IMMEDIATE statements alone (time in them, waits for the lock included),
# in the trial's thread and in the heartbeat's (which overlaps the trial).
BEGIN, HEARTBEAT_BEGIN = "BEGIN IMMEDIATE", "heartbeat's BEGIN"


class Ledger(TrialLedger):
    """bench_trial's ledger (exclusive seconds per bucket, per trial; the heartbeat thread's
    calls apart), plus SQL statements and transactions per bucket."""

    def bucket(self) -> str:
        if threading.current_thread() is not self.main:
            return "heartbeat thread"
        return self.stack[-1][0] if self.stack else "optimize loop"

    def count(self, what: str) -> None:
        self.now[f"{what}:{self.bucket().split(':')[0]}"] += 1

    def end_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """The last callback: closes the trial's books."""
        end = time.perf_counter()
        now, self.now = self.now, defaultdict(float)
        now["wall"], self.mark = end - self.mark, end
        now["storage"] = sum(v for k, v in now.items() if k.startswith("storage:"))
        known = ("storage", "sampler", "upload", "weights cb", "front table")
        now["model+rest"] = now["wall"] - sum(now[k] for k in known)
        self.trials.append(dict(now))


def patch_setup(setup: str, ledger: Ledger) -> None:
    """Point autoprune's SQLite hooks at the setup's (they are read when a storage opens);
    the BEGIN IMMEDIATE statements are timed on their own, in ``ledger``."""
    wal = not setup.startswith("nowal")
    immediate = setup.endswith("current") or setup.endswith("immediate")

    def pragmas(connection: Any, _record: Any) -> None:
        if wal:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
        if immediate:
            connection.isolation_level = None

    def begin(connection: Any) -> None:
        if immediate:
            start = time.perf_counter()
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            heartbeat = threading.current_thread() is not ledger.main
            ledger.now[HEARTBEAT_BEGIN if heartbeat else BEGIN] += time.perf_counter() - start

    storages._sqlite_pragmas, storages._sqlite_begin = pragmas, begin  # type: ignore[assignment]


def run(setup: str, task: Any, n_trials: int, prefill: int) -> list[dict[str, float]]:
    """One study of ``n_trials`` under ``setup``, after ``prefill`` synthetic trials; the
    ledger of each trial."""
    ledger = Ledger()
    patch_setup(setup, ledger)
    with tempfile.TemporaryDirectory() as tmp:
        url = None if setup == "memory" else f"sqlite:///{tmp}/bench.db"
        setup = make_setup(task, space=SearchSpace(), warm_start=None, artifacts=ArtifactSpec())
        study = open_study(setup, task, storage=url, study_name="b")
        if prefill:
            from bench_report import synthetic_trial  # digits-cnn's trials, made up

            rng = random.Random(0)
            study.add_trials([synthetic_trial(rng, n) for n in range(prefill)])
        objective, callbacks = objective_for(study, task)
        storage = study._storage
        names = [n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")]
        if rdb_storage(study) is not None:  # the stale-trial check at each trial's start
            names += ["record_heartbeat", "_get_stale_trial_ids"]
        for name in names:
            setattr(storage, name, ledger.wrap(getattr(storage, name), f"storage:{name}"))
        for name in [n for n in dir(optuna.samplers.BaseSampler) if not n.startswith("_")]:
            setattr(study.sampler, name, ledger.wrap(getattr(study.sampler, name), "sampler"))
        if objective.on_result is not None:
            objective.on_result = ledger.wrap(objective.on_result, "upload")
        labels = {FrontWeights: "weights cb", FrontTable: "front table"}
        wrapped = [ledger.wrap(c, labels[type(c)]) for c in callbacks]  # type: ignore[index]
        rdb = rdb_storage(study)
        if rdb is not None:
            sqlalchemy.event.listen(
                rdb.engine, "before_cursor_execute", lambda *a: ledger.count("sql")
            )
            sqlalchemy.event.listen(rdb.engine, "begin", lambda *a: ledger.count("tx"))
        ledger.mark = time.perf_counter()
        study.optimize(
            ledger.wrap(objective, "objective"),
            n_trials=n_trials,
            callbacks=[*wrapped, ledger.end_trial],
        )
        if rdb is not None:
            rdb.engine.dispose()
    return ledger.trials[1:]  # trial 0 is the warm-up


def mean(trials: list[dict[str, float]], key: str) -> float:
    return sum(t.get(key, 0.0) for t in trials) / len(trials)


def cell(values: list[float], scale: float = 1e3) -> str:
    values = [scale * v for v in values]
    return f"{statistics.median(values):6.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per study (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="studies per setup (default 3)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated setups")
    parser.add_argument(
        "--prefill", type=int, default=0, help="synthetic trials in the study first (default 0)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    setups = args.setups.split(",")
    if unknown := set(setups) - set(SETUPS):
        parser.error(f"unknown setups {sorted(unknown)}; known: {', '.join(SETUPS)}")
    if args.trials < 2:
        parser.error(f"--trials must be >= 2 (a warm-up and a measured trial), got {args.trials}")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = load_task("digits-cnn")
    runs: dict[str, list[list[dict[str, float]]]] = {s: [] for s in setups}
    for _ in range(args.repeat):
        for setup in setups:  # taking turns spreads the machine's noise over all setups
            runs[setup].append(run(setup, task, args.trials, args.prefill))
    print(f"digits-cnn, {args.trials} trials a study (trial 0 left out), after ", end="")
    print(f"{args.prefill} synthetic ones; {args.repeat} studies per setup")
    print("ms per trial: median over studies (min-max)\n")
    shown = (*COLUMNS, BEGIN, HEARTBEAT_BEGIN)
    print(f"{'setup':<17}" + "".join(f"{c:>20}" for c in shown))
    for setup in setups:
        row = [cell([mean(r, c) for r in runs[setup]]) for c in shown]
        print(f"{setup:<17}" + "".join(f"{c:>20}" for c in row))
    print("\nper trial: SQL statements / transactions begun, by who issued them (median)")
    issuers = sorted(
        {
            k.split(":", 1)[1]
            for rs in runs.values()
            for r in rs
            for t in r
            for k in t
            if k.startswith(("sql:", "tx:"))
        }
    )
    print(f"{'setup':<17}" + "".join(f"{c:>17}" for c in issuers))
    for setup in setups:
        parts = []
        for who in issuers:
            sql = statistics.median(mean(r, f"sql:{who}") for r in runs[setup])
            tx = statistics.median(mean(r, f"tx:{who}") for r in runs[setup])
            parts.append(f"{sql:.1f} / {tx:.1f}")
        print(f"{setup:<17}" + "".join(f"{p:>17}" for p in parts))
    print("\nOptuna storage calls per trial by method: calls, ms (median)")
    methods = sorted(
        {k for rs in runs.values() for r in rs for t in r for k in t if k.startswith("storage:")}
    )
    print(f"{'method':<40}" + "".join(f"{s:>18}" for s in setups))
    for method in methods:
        parts = []
        for setup in setups:
            ms = statistics.median(1e3 * mean(r, method) for r in runs[setup])
            calls = statistics.median(mean(r, f"calls:{method}") for r in runs[setup])
            parts.append(f"{calls:.1f}, {ms:.2f}")
        print(f"{method.split(':', 1)[1]:<40}" + "".join(f"{p:>18}" for p in parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
