"""Searched fronts against the pruning heuristics, at the same per-trial fine-tuning budget.

On digits-cnn and digits-mlp, for each seed (the dense model's and the study's): every
heuristic allocation (uniform, global, lamp, erk) is swept over sparsities 0.5 to 0.98, and an
autoprune study of at most 60 trials is run (the spec's defaults, in memory). Per method:

- best@s: the test accuracy of the point with the best VALIDATION accuracy among the method's
  front points with sparsity >= s (s = 0.8, 0.9, 0.95, 0.98); test accuracy never selects;
- hv: the hypervolume of the validation-selected front in (test accuracy, log10 density),
  from the reference point (accuracy 0.1 = chance, density 1);
- wall: seconds for all of the method's fine-tunings (and the study's sampling).

Means over seeds. Targets (issue 3), on each task: autoprune's best@0.9, @0.95 and @0.98 at
least the best heuristic's + 0.01, and its hv above every heuristic's. Exits 1 if one is missed
(with --quick, a smoke run of one seed and few trials, only sanity is checked).

    python scripts/bench_search.py [--quick] [--seeds 0 1 2] [--trials 60]
        [--parametrization allocation] [--sampler tpe] [--tasks digits-cnn digits-mlp]
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

from autoprune.allocation import ALLOCATIONS
from autoprune.heuristics import baseline
from autoprune.masks import prunable_layers
from autoprune.objective import trial_seed
from autoprune.search import search
from autoprune.spec import StudySpec
from autoprune.stopping import EarlyStop
from autoprune.tasks import load_task

SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
THRESHOLDS = (0.8, 0.9, 0.95, 0.98)
TARGETED = (0.9, 0.95, 0.98)
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


def sweep(task: Any, allocation: str, seed: int, sparsities: tuple[float, ...]) -> list[Point]:
    """The heuristic at each sparsity, fine-tuned as a study's trial would be."""
    layers = prunable_layers(task.model)
    points = []
    for i, target in enumerate(sparsities):
        m = baseline(task, allocation, target, seed=trial_seed(seed, i), layers=layers).metrics
        points.append(
            {"val": m["accuracy"], "test": m["test_accuracy"], "sparsity": m["sparsity"]}
        )
    return points


def study_points(task: Any, spec: StudySpec, seed: int, trials: int) -> tuple[list[Point], int]:
    """The front of an in-memory study run with ``spec``'s settings; and its stopped trials."""
    study = search(
        task,
        n_trials=trials,
        seed=seed,
        space=spec.space,
        sampler=spec.sampler,
        warm_start=spec.warm_start,
        constraints=spec.constraints,
        early_stop=spec.early_stop,
    )
    points = [
        {
            "val": t.values[0],
            "test": t.user_attrs["test_accuracy"],
            "sparsity": 1.0 - t.user_attrs["density"],
        }
        for t in study.best_trials
    ]
    return points, sum(t.state == TrialState.PRUNED for t in study.trials)


def run(args: argparse.Namespace, spec: StudySpec) -> dict[str, dict[str, list[dict[str, float]]]]:
    """``{task: {method: [per-seed row]}}``, each row holding best@s, hv and wall seconds."""
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for task_name in args.tasks:
        rows: dict[str, list[dict[str, float]]] = defaultdict(list)
        for seed in args.seeds:
            task = load_task(task_name, seed=seed)
            runs: dict[str, tuple[list[Point], float, int]] = {}
            for allocation in ALLOCATIONS:
                start = time.perf_counter()
                points = sweep(task, allocation, seed, args.sweep)
                runs[allocation] = (points, time.perf_counter() - start, 0)
            start = time.perf_counter()
            points, stopped = study_points(task, spec, seed, args.trials)
            runs["autoprune"] = (points, time.perf_counter() - start, stopped)
            for method, (points, wall, stopped) in runs.items():
                row = {f"best@{t}": best_at(points, t) for t in THRESHOLDS}
                row |= {"hv": hypervolume(points), "wall": wall, "stopped": stopped}
                rows[method].append(row)
            print(f"{task_name} seed {seed}: done", file=sys.stderr, flush=True)
        results[task_name] = dict(rows)
    return results


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    columns = [*(f"best@{t}" for t in THRESHOLDS), "hv", "wall", "stopped"]
    lines = []
    for task_name, rows in results.items():
        n = len(next(iter(rows.values())))
        lines.append(f"\n{task_name} (mean over {n} seeds; best@s = test accuracy, val-selected)")
        lines.append(f"{'method':<11}" + "".join(f"{c:>12}" for c in columns))
        for method, seeds in rows.items():
            means = [statistics.fmean(r[c] for r in seeds) for c in columns]
            cells = [f"{v:12.4f}" for v in means[:5]] + [f"{means[5]:11.1f}s", f"{means[6]:12.1f}"]
            lines.append(f"{method:<11}" + "".join(cells))
    return "\n".join(lines)


def misses(results: dict[str, dict[str, list[dict[str, float]]]], quick: bool) -> list[str]:
    """Sanity (always) and the issue's targets (not with --quick), as failure messages."""
    failures = []
    for task_name, rows in results.items():
        mean = {
            method: {c: statistics.fmean(r[c] for r in seeds) for c in seeds[0]}
            for method, seeds in rows.items()
        }
        ours = mean.pop("autoprune")
        if not all(0.0 <= ours[f"best@{t}"] <= 1.0 for t in THRESHOLDS):
            failures.append(f"{task_name}: autoprune has no front point at some level: {ours}")
        if quick:
            continue
        for t in TARGETED:
            key, best = f"best@{t}", max(m[f"best@{t}"] for m in mean.values())
            if not ours[key] >= best + MARGIN:
                failures.append(
                    f"{task_name}: autoprune {key} {ours[key]:.4f} < best heuristic {best:.4f} "
                    f"+ {MARGIN}"
                )
        for method, m in mean.items():
            if not ours["hv"] > m["hv"]:
                failures.append(f"{task_name}: autoprune hv {ours['hv']:.4f} <= {method}'s")
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
        f"bench_search: seeds {args.seeds}, {args.trials} trials per study, sweep {args.sweep}, "
        f"parametrization {spec.space.parametrization}, schedules {spec.space.schedules}, "
        f"sampler {spec.sampler}, "
        f"early stop margin {spec.early_stop.margin}, warm start {spec.warm_start.to_dict()}"
    )
    results = run(args, spec)
    print(table(results))
    failures = misses(results, args.quick)
    if len(args.seeds) < 3 and not args.quick:
        failures.append(f"the targets are means over at least 3 seeds, got {args.seeds}")
    for failure in failures:
        print(f"bench_search: MISSED: {failure}", file=sys.stderr)
    if not failures:
        print("\nbench_search: all " + ("sanity checks" if args.quick else "targets") + " met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
