"""Where the time of one autoprune trial goes, on the built-in digits-cnn task.

Runs a study as ``autoprune search`` does (same sampler, objective and progress callback) and
splits each trial's wall time, measured from the outside, into the objective's phases (its
``timings`` user attrs), the rest of the objective, the sampler, the storage, the progress
callback, and what is left. Trial 0 is the warm-up, reported apart. Exits non-zero when the
accounting does not add up, so that the benchmark can fail.

    python scripts/bench_trial.py [--trials 30] [--storage sqlite:///x.db | memory] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import optuna
import torch

from autoprune.cli.searching import _Progress
from autoprune.errors import TrialFailed
from autoprune.study.objective import Objective
from autoprune.study.setup import make_setup
from autoprune.study.space import SearchSpace
from autoprune.study.study import open_study
from autoprune.tasks import load_task

PHASES = ("scoring", "masking", "finetuning", "evaluation")
OVERHEAD: tuple[str, ...] = ("objective, outside phases", "calibration grads", "sampler")
OVERHEAD += ("storage", "progress callback", "other")
ROWS = PHASES + OVERHEAD
TOLERANCE = 0.10  # the largest share of a trial's wall time that may go unaccounted


class Ledger:
    """Exclusive time per bucket and trial. A timed call made inside another is charged to the
    outer one (the sampler's storage reads are sampling; the callback's are the callback's),
    except inside the objective, whose storage writes and sampler calls count as such. Calls
    from other threads (a heartbeat) overlap the trial: they go to "heartbeat thread" alone.
    ``calls:<bucket>`` counts the timed calls."""

    def __init__(self) -> None:
        self.trials: list[dict[str, float]] = []
        self.now: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [bucket, when its current stretch began]
        self.mark = time.perf_counter()
        self.main = threading.main_thread()

    def wrap(self, fn: Callable[..., Any], bucket: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not self.main:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.now["heartbeat thread"] += time.perf_counter() - start
            if self.stack and self.stack[-1][0] != "objective":
                return fn(*args, **kwargs)
            start = time.perf_counter()
            if self.stack:  # pause the objective
                self.now["objective"] += start - self.stack[-1][1]
            self.stack.append([bucket, start])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.now[bucket] += end - self.stack.pop()[1]
                self.now[f"calls:{bucket}"] += 1
                if self.stack:
                    self.stack[-1][1] = end

        return timed

    def end_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """The last callback: closes the trial's books (its wall time runs mark to mark)."""
        end = time.perf_counter()
        now, self.now = self.now, defaultdict(float)
        now["wall"], self.mark = end - self.mark, end
        now.update({p: trial.user_attrs.get("timings", {}).get(p, 0.0) for p in PHASES})
        now["objective, outside phases"] = now.pop("objective", 0.0) - sum(now[p] for p in PHASES)
        now["other"] = now["wall"] - sum(now[r] for r in ROWS[:-1])
        self.trials.append(dict(now))


def run(args: argparse.Namespace) -> tuple[optuna.Study, Ledger, dict[str, float]]:
    """Run the study with every bucket wrapped; return it, its ledger and the run's times."""
    clock = {"start": time.perf_counter()}
    task, space = load_task("digits-cnn"), SearchSpace()
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or f"sqlite:///{tmp}/bench.db"
        storage_arg = None if storage == "memory" else storage
        setup = make_setup(task, space=space, warm_start=None)
        study = open_study(setup, task, storage=storage_arg, study_name="b")
        objective = Objective(task, space, setup.layers, seed=0)
        with contextlib.redirect_stderr(io.StringIO()):  # the bar is drawn, off screen
            progress = _Progress(args.trials)
        ledger = Ledger()
        for bucket, obj, api in (
            ("sampler", study.sampler, optuna.samplers.BaseSampler),
            ("storage", study._storage, optuna.storages.BaseStorage),
        ):
            for name in [n for n in dir(api) if not n.startswith("_")]:
                setattr(obj, name, ledger.wrap(getattr(obj, name), bucket))
        # Computed once per study, outside the `timings` of the first trial that needs them.
        stats_for = ledger.wrap(objective._stats_for, "calibration grads")
        objective._stats_for = stats_for  # type: ignore[method-assign]
        ledger.mark = start = time.perf_counter()
        study.optimize(
            ledger.wrap(objective, "objective"),
            n_trials=args.trials,
            catch=(TrialFailed,),
            callbacks=[ledger.wrap(progress, "progress callback"), ledger.end_trial],
        )
        clock["optimize"], clock["run"] = time.perf_counter() - start, time.perf_counter()
        progress.bar.close()
    return study, ledger, clock


def report(study: optuna.Study, ledger: Ledger, clock: dict[str, float], storage: str) -> int:
    """Print the time split; return the number of accounting errors (printed to stderr)."""
    n, warm, rest = len(ledger.trials), ledger.trials[0], ledger.trials[1:]
    mean = {k: sum(t[k] for t in rest) / len(rest) for k in (*ROWS, "wall")}
    failed = sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
    threads = torch.get_num_threads()
    print(f"digits-cnn: {n} trials ({failed} failed), storage {storage}, torch threads {threads}")
    print(f"ms per trial: mean over trials 1-{n - 1}, and trial 0 (the warm-up)\n")
    print(f"{'phase':<27}{'ms/trial':>9}{'share':>8}{'trial 0 ms':>12}")
    for row in (*ROWS, "wall"):
        share = 100 * mean[row] / mean["wall"]
        print(f"{row:<27}{1e3 * mean[row]:9.1f}{share:7.1f}%{1e3 * warm[row]:12.1f}")
    overhead, whole = sum(mean[r] for r in OVERHEAD), clock["run"] - clock["start"]
    print(f"\noutside the model: {1e3 * overhead:.1f} ms/trial, {overhead / mean['wall']:.1%}")
    print(f"whole run {whole:.2f} s; study.optimize: {n / clock['optimize']:.2f} trials/s")
    if n >= 20:  # TPE samples after 10 random trials: its cost (and others') as trials grow
        windows = {"1-9": ledger.trials[1:10], "10-14": ledger.trials[10:15]}
        windows[f"{n - 5}-{n - 1}"] = ledger.trials[n - 5 :]
        for row in ("sampler", "storage", "progress callback"):
            parts = (f"{1e3 * sum(t[row] for t in ts) / len(ts):.1f}" for ts in windows.values())
            print(f"{row} ms/trial, trials {', '.join(windows)}: {', '.join(parts)}")
    errors = accounting_errors(ledger.trials, mean)
    for error in errors:
        print(f"bench_trial: FAIL: {error}", file=sys.stderr)
    return len(errors)


def accounting_errors(trials: list[dict[str, float]], mean: dict[str, float]) -> list[str]:
    """Each part is a disjoint stretch of its trial's wall time: none may be negative, and
    together they must cover all but ``TOLERANCE`` of it."""
    errors = []
    for i, t in enumerate(trials):
        errors += [f"trial {i}: {r} is {1e3 * t[r]:.2f} ms" for r in ROWS if t[r] < -1e-6]
    for label, t in (("mean trial", mean), ("trial 0", trials[0])):
        if t["other"] > TOLERANCE * t["wall"]:
            ms = f"{1e3 * t['other']:.1f} of {1e3 * t['wall']:.1f} ms"
            errors.append(f"{label}: {ms} unaccounted, over {TOLERANCE:.0%}")
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="trials to run (default: 30)")
    parser.add_argument("--storage", help="URL or 'memory' (default: SQLite file in a temp dir)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.trials < 2:
        parser.error(f"--trials must be >= 2 (a warm-up and a measured trial), got {args.trials}")
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, ledger, clock = run(args)
    return 1 if report(study, ledger, clock, args.storage or "sqlite (temp file)") else 0


if __name__ == "__main__":
    sys.exit(main())
