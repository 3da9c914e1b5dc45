"""Recovery settings against the task's own fine-tune, at the same budget (issue 14, items 1-2).

For each task, seed (the dense model's and the fine-tune's), target sparsity and heuristic
schedule, LAMP magnitude pruning is fine-tuned once with the task's recipe (row ``base``) and
once per recovery variant (distillation, a rewound learning rate, a scaled one), through
:func:`autoprune.trial.baseline` (``autoprune prune``'s code path). Printed per task and
target: the mean validation and test accuracy of each variant over seeds and schedules, and
its lead over ``base``; then the fine-tune time of distillation against ``base`` and the
teacher's share of it. Used to choose ``SearchSpace``'s recovery defaults.

With ``--search N``, instead: studies of N trials through ``autoprune.search`` (default
arguments but the space) with and without searched recovery settings, each printed with the
test accuracy of its val-selected front point at >= 0.9, 0.95, 0.98 sparsity and its
hypervolume (as ``scripts/bench_search.py`` computes them), means over seeds.

    nice python scripts/bench_recovery.py [--tasks digits-cnn digits-mlp] [--seeds 0 1]
        [--targets 0.95 0.98] [--schedules oneshot gradual] [--variants base rewind ...]
        [--temperature 4] [--rewind-peak 3] [--search 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from _search_bench import best_at, hypervolume  # scripts/ is on the path of a script

from autoprune import SearchSpace, recovery
from autoprune.pruning.masks import prunable_layers
from autoprune.run.searching import search
from autoprune.tasks import load_task
from autoprune.trial import baseline, trial_seed

SPACES: dict[str, dict[str, object]] = {
    "task's recipe": {"lr_scale": (1.0, 1.0), "distill": (0.0,), "rewinds": (False,)},
    "lr_scale 0.5-16": {"lr_scale": (0.5, 16.0), "distill": (0.0,), "rewinds": (False,)},
    "lr_scale 0.5-16, rewinds": {
        "lr_scale": (0.5, 16.0),
        "distill": (0.0,),
        "rewinds": (False, True),
    },
    "lr_scale 0.5-16, distill": {
        "lr_scale": (0.5, 16.0),
        "distill": (0.0, 0.5),
        "rewinds": (False,),
    },
}

VARIANTS: dict[str, dict[str, object]] = {
    "base": {},
    "distill=0.5": {"distill": 0.5},
    "distill=0.9": {"distill": 0.9},
    "rewind": {"rewind": True},
    "lr_scale=0.5": {"lr_scale": 0.5},
    "lr_scale=2": {"lr_scale": 2.0},
    "rewind+distill=0.5": {"rewind": True, "distill": 0.5},
    "lr_scale=4": {"lr_scale": 4.0},
    "lr_scale=2+distill=0.5": {"lr_scale": 2.0, "distill": 0.5},
    "lr_scale=2+rewind": {"lr_scale": 2.0, "rewind": True},
    "lr_scale=8": {"lr_scale": 8.0},
    "lr_scale=16": {"lr_scale": 16.0},
    "lr_scale=4+distill=0.5": {"lr_scale": 4.0, "distill": 0.5},
    "lr_scale=4+rewind": {"lr_scale": 4.0, "rewind": True},
}

DEFAULT_VARIANTS = [
    "base",
    "distill=0.5",
    "rewind",
    "lr_scale=0.5",
    "lr_scale=2",
    "lr_scale=4",
    "lr_scale=16",
    "lr_scale=4+distill=0.5",
    "lr_scale=4+rewind",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits-cnn", "digits-mlp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.95, 0.98])
    parser.add_argument("--schedules", nargs="+", default=["oneshot", "gradual"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--temperature", type=float, default=recovery.DISTILL_TEMPERATURE)
    parser.add_argument("--rewind-peak", type=float, default=recovery.REWIND_PEAK)
    parser.add_argument("--search", type=int, default=0, metavar="TRIALS")
    parser.add_argument("--spaces", nargs="+", default=list(SPACES))
    args = parser.parse_args()
    # Module constants, read at each use: a measurement of other values than the defaults.
    recovery.DISTILL_TEMPERATURE, recovery.REWIND_PEAK = args.temperature, args.rewind_peak
    if args.search:
        compare_searches(args.tasks, args.seeds, args.search, args.spaces)
        return
    torch.set_num_threads(1)
    for name in args.tasks:
        accuracy: dict[tuple[float, str], list[tuple[float, float]]] = defaultdict(list)
        seconds: dict[str, list[float]] = defaultdict(list)
        teacher: list[float] = []
        for seed in args.seeds:
            task = load_task(name, seed=seed)
            layers = prunable_layers(task.model)
            baseline(task, "lamp", 0.5, layers=layers)  # warm-up: the first fine-tune is slow
            for i, target in enumerate(args.targets):
                for schedule in args.schedules:
                    for variant in args.variants:
                        start = time.perf_counter()
                        result = baseline(
                            task,
                            "lamp",
                            target,
                            seed=trial_seed(seed, i),
                            layers=layers,
                            schedule=schedule,
                            **VARIANTS[variant],  # type: ignore[arg-type]
                        )
                        m = result.metrics
                        accuracy[target, variant].append((m["accuracy"], m["test_accuracy"]))
                        seconds[variant].append(result.timings["finetuning"])
                        if "teacher" in result.timings:
                            teacher.append(
                                result.timings["teacher"] / result.timings["finetuning"]
                            )
                        print(
                            f"  {name} seed {seed} {target} {schedule:8} {variant:20} "
                            f"val {m['accuracy']:.4f} test {m['test_accuracy']:.4f} "
                            f"({time.perf_counter() - start:.1f}s)",
                            flush=True,
                        )
        print(f"\n{name}: mean over seeds {args.seeds} and schedules {args.schedules}")
        for target in args.targets:
            base = statistics.mean(t for _, t in accuracy[target, "base"])
            for variant in args.variants:
                vals, tests = zip(*accuracy[target, variant], strict=True)
                val, test = statistics.mean(vals), statistics.mean(tests)
                print(
                    f"  {target:.2f} {variant:20} val {val:.4f} test {test:.4f} "
                    f"({test - base:+.4f} test vs base)"
                )
        for variant in args.variants:
            ratio = statistics.mean(seconds[variant]) / statistics.mean(seconds["base"])
            print(f"  fine-tune time {variant:20} x{ratio:.2f} of base")
        if teacher:
            print(f"  teacher's share of a distilling fine-tune: {statistics.mean(teacher):.1%}")


def compare_searches(tasks: list[str], seeds: list[int], trials: int, spaces: list[str]) -> None:
    for name in tasks:
        rows: dict[str, list[list[float]]] = defaultdict(list)
        for seed in seeds:
            task = load_task(name, seed=seed)
            for space_name in spaces:
                start = time.perf_counter()
                study = search(
                    task, n_trials=trials, seed=seed, space=SearchSpace(**SPACES[space_name])
                )  # type: ignore[arg-type]
                points = [
                    {
                        "val": t.values[0],
                        "test": t.user_attrs["test_accuracy"],
                        "sparsity": 1.0 - t.user_attrs["density"],
                    }
                    for t in study.best_trials
                ]
                row = [best_at(points, s) for s in (0.9, 0.95, 0.98)] + [hypervolume(points)]
                rows[space_name].append(row)
                print(
                    f"  {name} seed {seed} {space_name:26} "
                    + " ".join(f"{v:.4f}" for v in row)
                    + f" ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
        print(f"\n{name}: {trials} trials, mean over seeds {seeds}")
        print(f"  {'space':26} best@0.9 best@0.95 best@0.98 hv")
        for space_name in spaces:
            means = [statistics.mean(column) for column in zip(*rows[space_name], strict=True)]
            print(f"  {space_name:26} " + " ".join(f"{v:.4f}" for v in means))


if __name__ == "__main__":
    main()
