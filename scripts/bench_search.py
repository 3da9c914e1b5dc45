"""Searched fronts against the pruning heuristics, at the same per-trial fine-tuning budget.

On digits-cnn and digits-mlp, for each seed (the dense model's and the study's): every heuristic
allocation (uniform, global, lamp, erk) is swept over sparsities 0.5 to 0.98 with each
heuristic schedule, and an autoprune study of at most 60 trials is run (the spec's defaults,
in memory), twice: through the spec's path (row ``autoprune``) and through
``autoprune.search(task, n_trials=..., seed=...)`` with every other argument left at its
default (row ``autoprune (API)``). The two must give the very same front, else exit 1. The
heuristic schedules are ``oneshot`` (pruned, then fine-tuned: rows ``lamp``, ``global``, ...)
and ``gradual`` (cubic AGP over the same fine-tuning, the schedule autoprune's space searches:
rows ``lamp+gradual``, ...), both through ``autoprune prune``'s code path
(:func:`autoprune.trial.baseline`). Per method:

- best@s: the test accuracy of the point with the best VALIDATION accuracy among the method's
  front points with sparsity >= s (s = 0.8, 0.9, 0.95, 0.98); test accuracy never selects;
- hv: the hypervolume of the validation-selected front in (test accuracy, log10 density),
  from the reference point (accuracy 0.1 = chance, density 1);
- wall: seconds for all of the method's fine-tunings (and the study's sampling).

Means over seeds. Under the table, per task, autoprune's lead over the best heuristic row in
each column (which row that is, in brackets), over the one-shot rows and over all rows.
Targets (issue 3), on each task, against ALL heuristic rows (gradual ones included):
autoprune's best@0.9, @0.95 and @0.98 at least the best heuristic's + 0.01, and its hv above
every heuristic's. Exits 1 if one is missed (with --quick, a smoke run of one seed and few
trials, only sanity is checked).

    python scripts/bench_search.py [--quick] [--seeds 0 1 2] [--trials 60]
        [--parametrization allocation] [--sampler tpe] [--tasks digits-cnn digits-mlp]
        [--heuristic-schedules oneshot gradual] [--allocations uniform global lamp erk]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np
import optuna
import torch
from optuna._hypervolume import compute_hypervolume
from optuna.trial import TrialState

from autoprune.pruning.allocation import ALLOCATIONS
from autoprune.pruning.masks import prunable_layers
from autoprune.pruning.policy import SCHEDULES
from autoprune.run.searching import search
from autoprune.run.worker import run_worker
from autoprune.spec import StudySpec
from autoprune.study.stopping import EarlyStop
from autoprune.study.study import open_study
from autoprune.tasks import load_task
from autoprune.trial import baseline, trial_seed

SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
THRESHOLDS = (0.8, 0.9, 0.95, 0.98)
TARGETED = (0.9, 0.95, 0.98)
HEURISTIC_SCHEDULES = ("oneshot", "gradual")
API_ROW = "autoprune (API)"  # autoprune.search(task, n_trials, seed): default arguments
MARGIN = 0.01  # autoprune must beat the best heuristic by this much at each targeted level
CHANCE = 0.1  # the hypervolume's reference accuracy (10 classes)
Point = dict[str, float]  # val, test, sparsity


def best_at(points: list[Point], threshold: float) -> float:
    """Test accuracy of the best-validation point with sparsity >= threshold (nan if none).
    Ties go to the sparser point."""
    eligible = [p for p in points if p["sparsity"] >= threshold - 1e-9]
    if not eligible:
        return math.nan
    return max(eligible, key=lambda p: (p["val"], p["sparsity"]))["test"]


def val_front(points: list[Point]) -> list[Point]:
    """Points no other point beats on validation accuracy and sparsity together."""
    return [
        p
        for p in points
        if not any(
            q["val"] >= p["val"]
            and q["sparsity"] >= p["sparsity"]
            and (q["val"] > p["val"] or q["sparsity"] > p["sparsity"])
            for q in points
        )
    ]


def hypervolume(points: list[Point]) -> float:
    """Of the validation front, in (test accuracy, log10 density), both taken as losses."""
    losses = [
        [-p["test"], math.log10(max(1.0 - p["sparsity"], 1e-12))]
        for p in val_front(points)
        if p["test"] > CHANCE
    ]
    if not losses:
        return 0.0
    return float(compute_hypervolume(np.array(losses), np.array([-CHANCE, 0.0])))


def sweep(
    task: Any,
    allocation: str,
    seed: int,
    sparsities: tuple[float, ...],
    schedule: str = "oneshot",
) -> list[Point]:
    """The heuristic at each sparsity, fine-tuned as a study's trial would be. Each schedule
    gets the same seeds, so that rows differ by their schedule alone."""
    layers = prunable_layers(task.model)
    points = []
    for i, target in enumerate(sparsities):
        seed_i = trial_seed(seed, i)
        result = baseline(task, allocation, target, seed=seed_i, layers=layers, schedule=schedule)
        m = result.metrics
        points.append(
            {"val": m["accuracy"], "test": m["test_accuracy"], "sparsity": m["sparsity"]}
        )
    return points


def study_points(
    task: Any, spec: StudySpec | None, seed: int, trials: int
) -> tuple[list[Point], int]:
    """The front of an in-memory study, and its stopped trials. ``spec`` None: through the
    Python API with its default arguments (``autoprune.search(task, n_trials, seed)``);
    else through the spec's path (``StudySpec.setup``, as ``autoprune search SPEC``)."""
    if spec is None:
        study = search(task, n_trials=trials, seed=seed)
    else:
        spec = dataclasses.replace(spec, task=task.name, trials=trials, seed=seed)
        study = open_study(spec.setup(task), task, storage=None, study_name=None)
        run_worker(study, task, target=trials)
    points = [
        {
            "val": t.values[0],
            "test": t.user_attrs["test_accuracy"],
            "sparsity": 1.0 - t.user_attrs["density"],
        }
        for t in study.best_trials
    ]
    return points, sum(t.state == TrialState.PRUNED for t in study.trials)


def method_name(allocation: str, schedule: str) -> str:
    """A heuristic row's name: ``lamp`` (one-shot), ``lamp+gradual``."""
    return allocation if schedule == "oneshot" else f"{allocation}+{schedule}"


def run(args: argparse.Namespace, spec: StudySpec) -> Results:
    """``{task: {method: [per-seed row]}}``, each row holding best@s, hv and wall seconds."""
    results: Results = {}
    for task_name in args.tasks:
        rows: dict[str, list[dict[str, float]]] = defaultdict(list)
        for seed in args.seeds:
            task = load_task(task_name, seed=seed)
            runs: dict[str, tuple[list[Point], float, int]] = {}
            for schedule in args.heuristic_schedules:
                for allocation in args.allocations:
                    start = time.perf_counter()
                    points = sweep(task, allocation, seed, args.sweep, schedule)
                    runs[method_name(allocation, schedule)] = (
                        points,
                        time.perf_counter() - start,
                        0,
                    )
            # The spec's path always; the Python API's defaults too, unless the spec was
            # changed by an option: both must give the very same front.
            start = time.perf_counter()
            points, stopped = study_points(task, spec, seed, args.trials)
            runs["autoprune"] = (points, time.perf_counter() - start, stopped)
            if not args.overridden:
                start = time.perf_counter()
                api, stopped = study_points(task, None, seed, args.trials)
                runs[API_ROW] = (api, time.perf_counter() - start, stopped)
                if api != points:
                    args.api_differs.append(f"{task_name} seed {seed}")
            for method, (points, wall, stopped) in runs.items():
                row = {f"best@{t}": best_at(points, t) for t in THRESHOLDS}
                row |= {"hv": hypervolume(points), "wall": wall, "stopped": stopped}
                rows[method].append(row)
            print(f"{task_name} seed {seed}: done", file=sys.stderr, flush=True)
        results[task_name] = dict(rows)
    return results


Results = dict[str, dict[str, list[dict[str, float]]]]  # {task: {method: [per-seed row]}}


def means(rows: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """``{method: {column: mean over seeds}}``."""
    return {
        method: {c: statistics.fmean(r[c] for r in seeds) for c in seeds[0]}
        for method, seeds in rows.items()
    }


def best_heuristic(heuristics: dict[str, dict[str, float]], column: str) -> tuple[str, float]:
    """The heuristic row with the highest mean ``column``, and that mean."""
    method = max(heuristics, key=lambda m: heuristics[m][column])
    return method, heuristics[method][column]


def table(results: Results) -> str:
    columns = [*(f"best@{t}" for t in THRESHOLDS), "hv", "wall", "stopped"]
    width = max(len("method"), *(len(m) for rows in results.values() for m in rows)) + 1
    lines = []
    for task_name, rows in results.items():
        n = len(next(iter(rows.values())))
        lines.append(f"\n{task_name} (mean over {n} seeds; best@s = test accuracy, val-selected)")
        lines.append(f"{'method':<{width}}" + "".join(f"{c:>12}" for c in columns))
        for method, m in means(rows).items():
            values = [m[c] for c in columns]
            cells = [f"{v:12.4f}" for v in values[:5]]
            cells += [f"{values[5]:11.1f}s", f"{values[6]:12.1f}"]
            lines.append(f"{method:<{width}}" + "".join(cells))
        lines.append(leads(means(rows)))
    return "\n".join(lines)


def leads(mean: dict[str, dict[str, float]]) -> str:
    """autoprune's lead over the best one-shot heuristic row and over the best of all heuristic
    rows (the targets' reference), per column, naming the row."""
    heuristics = {m: v for m, v in mean.items() if m not in ("autoprune", API_ROW)}
    groups = {
        "best one-shot row": {m: v for m, v in heuristics.items() if "+" not in m},
        "best of all rows": heuristics,
    }
    groups = {name: group for name, group in groups.items() if group}
    header = f"{'lead':<10}{'autoprune':>10}" + "".join(
        f"  {name:<23}{'lead':>8}" for name in groups
    )
    lines = [header]
    for column in [*(f"best@{t}" for t in THRESHOLDS), "hv"]:
        ours = mean["autoprune"][column]
        line = f"{column:<10}{ours:10.4f}"
        for group in groups.values():
            method, best = best_heuristic(group, column)
            line += f"  {method:<15}{best:8.4f}{ours - best:+8.4f}"
        lines.append(line)
    return "\n".join(lines)


def misses(results: Results, quick: bool) -> list[str]:
    """Sanity (always) and the issue's targets (not with --quick), as failure messages. The
    targets compare with every heuristic row, one-shot and gradual."""
    failures = []
    for task_name, rows in results.items():
        heuristics = means(rows)
        ours = heuristics.pop("autoprune")
        heuristics.pop(API_ROW, None)
        if not all(0.0 <= ours[f"best@{t}"] <= 1.0 for t in THRESHOLDS):
            failures.append(f"{task_name}: autoprune has no front point at some level: {ours}")
        if quick:
            continue
        for t in TARGETED:
            key = f"best@{t}"
            method, best = best_heuristic(heuristics, key)
            if not ours[key] >= best + MARGIN:
                failures.append(
                    f"{task_name}: autoprune {key} {ours[key]:.4f} < best heuristic "
                    f"({method}) {best:.4f} + {MARGIN}"
                )
        for method, m in heuristics.items():
            if not ours["hv"] > m["hv"]:
                failures.append(
                    f"{task_name}: autoprune hv {ours['hv']:.4f} <= {method}'s {m['hv']:.4f}"
                )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 16 trials, sanity only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=60, help="trials per study (<= 60)")
    parser.add_argument("--tasks", nargs="+", default=["digits-cnn", "digits-mlp"])
    parser.add_argument("--parametrization", help="override the spec default's")
    parser.add_argument("--sampler", help="override the spec default's")
    parser.add_argument("--early-stop", help="margin, or 'off' (default: the spec default's)")
    parser.add_argument("--schedules", nargs="+", help="searched schedules (override)")
    parser.add_argument("--warm-schedules", nargs="+", help="warm-start schedules (override)")
    parser.add_argument("--warm-allocations", nargs="+", help="warm-start allocations (override)")
    parser.add_argument(
        "--heuristic-schedules",
        nargs="+",
        default=list(HEURISTIC_SCHEDULES),
        choices=SCHEDULES,
        help="schedules each heuristic is swept with (the targets need the default)",
    )
    parser.add_argument(
        "--allocations",
        nargs="+",
        default=list(ALLOCATIONS),
        choices=list(ALLOCATIONS),
        help="heuristic allocations swept (the targets need all)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    args.sweep = SWEEP
    if args.quick:
        args.seeds, args.trials, args.sweep = args.seeds[:1], 16, (0.5, 0.8, 0.9, 0.95, 0.98)
    if not 1 <= args.trials <= 60:
        parser.error(f"--trials must be in 1..60, got {args.trials}")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = StudySpec()
    args.overridden = any(
        getattr(args, key)
        for key in ("parametrization", "sampler", "schedules", "warm_schedules")
        + ("warm_allocations", "early_stop")
    )
    args.api_differs = []
    if args.parametrization:
        spec = dataclasses.replace(
            spec, space=dataclasses.replace(spec.space, parametrization=args.parametrization)
        )
    if args.sampler:
        spec = dataclasses.replace(spec, sampler=args.sampler)
    if args.schedules:
        space = dataclasses.replace(spec.space, schedules=tuple(args.schedules))
        spec = dataclasses.replace(spec, space=space)
    for key, value in (
        ("schedules", args.warm_schedules),
        ("allocations", args.warm_allocations),
    ):
        if value:
            warm = dataclasses.replace(spec.warm_start, **{key: tuple(value)})
            spec = dataclasses.replace(spec, warm_start=warm)
    if args.early_stop:
        margin = None if args.early_stop == "off" else float(args.early_stop)
        spec = dataclasses.replace(spec, early_stop=EarlyStop(margin=margin))
    print(
        f"bench_search: seeds {args.seeds}, {args.trials} trials per study, sweep {args.sweep} "
        f"of {args.allocations} with {args.heuristic_schedules}, "
        f"parametrization {spec.space.parametrization}, schedules {spec.space.schedules}, "
        f"sampler {spec.sampler}, "
        f"early stop margin {spec.early_stop.margin}, warm start {spec.warm_start.to_dict()}"
    )
    results = run(args, spec)
    print(table(results))
    failures = misses(results, args.quick)
    if args.api_differs:
        failures.append(
            "the Python API's defaults and the spec's gave different fronts: "
            + ", ".join(args.api_differs)
        )
    elif not args.overridden:
        print("\nthe Python API's defaults and the spec's gave the same front on every run")
    if len(args.seeds) < 3 and not args.quick:
        failures.append(f"the targets are means over at least 3 seeds, got {args.seeds}")
    swept = (set(args.allocations), set(args.heuristic_schedules))
    if swept != (set(ALLOCATIONS), set(HEURISTIC_SCHEDULES)) and not args.quick:
        failures.append(
            f"the targets are against allocations {list(ALLOCATIONS)} with schedules "
            f"{list(HEURISTIC_SCHEDULES)}, got {args.allocations} with {args.heuristic_schedules}"
        )
    for failure in failures:
        print(f"bench_search: MISSED: {failure}", file=sys.stderr)
    if not failures:
        print("\nbench_search: all " + ("sanity checks" if args.quick else "targets") + " met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
