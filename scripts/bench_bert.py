"""The digits-bert studies' fronts against uniform pruning, at the same fine-tuning budget.

Runs a study spec of the built-in digits-bert task in memory (``studies/digits_bert.toml`` by
default: unstructured and structured trials in one study, size = nonzero weights of the
prunable Linear layers; or ``studies/digits_bert_heads.toml``: heads and neurons, size = MACs),
and the uniform heuristics of the spec's granularities with the task's fine-tuning recipe:

- ``uniform``: every layer's weights pruned to the same sparsity by magnitude
  (``autoprune prune``'s path, :func:`autoprune.trial.baseline`);
- ``l1-uniform``: every layer loses the same fraction of its heads and of its FFN neurons,
  chosen by L1 norm.

For each heuristic point it prints the front trial of at most its size with the best
validation accuracy, with both points' test accuracy; then the hypervolume of each method's
validation front in (test accuracy, log10 of the size relative to the dense model's), as
scripts/bench_search.py computes it. Exits 1 unless the front matches or beats every heuristic
point on validation accuracy at no more size, and its hypervolume beats each heuristic's.

    python scripts/bench_bert.py [--spec studies/digits_bert.toml] [--trials 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import optuna
import torch
from bench_search import Point, hypervolume

from autoprune import Policy, measure, prune_and_finetune
from autoprune.pruning.masks import prunable_layers
from autoprune.pruning.structured import channel_groups
from autoprune.run.worker import run_worker
from autoprune.spec import StudySpec, load_spec
from autoprune.study.study import open_study
from autoprune.task import Task
from autoprune.trial import PruneResult, baseline, trial_seed

SPEC = Path(__file__).resolve().parent.parent / "studies" / "digits_bert.toml"
SPARSITIES = (0.5, 0.7, 0.8, 0.9)
CHANNEL_SPARSITIES = (0.25, 0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class Sizer:
    """Measures the spec's size objective, and relates it to the dense model's."""

    name: str
    context: measure.Context
    dense: float

    @classmethod
    def of(cls, spec: StudySpec, task: Task) -> Sizer:
        layers = tuple(prunable_layers(task.model, spec.space.include, spec.space.exclude))
        context = measure.Context(task.example(1), layers, forward=task.forward)
        name = spec.objectives[1]
        return cls(name, context, measure.measure(task.model, [name], context)[name])

    def point(self, val: float, test: float, size: float, label: str) -> Point:
        return {
            "val": val,
            "test": test,
            "size": size,
            "sparsity": 1.0 - size / self.dense,
            "label": label,
        }  # type: ignore[dict-item]

    def of_result(self, result: PruneResult, label: str) -> Point:
        size = measure.measure(result.model, [self.name], self.context)[self.name]
        m = result.metrics
        return self.point(m["accuracy"], m["test_accuracy"], size, label)


def heuristics(spec: StudySpec, task: Task, sizer: Sizer, seed: int) -> dict[str, list[Point]]:
    """Uniform magnitude and uniform L1 heads/neurons (those the spec searches), fine-tuned
    as a trial is."""
    rows: dict[str, list[Point]] = {}
    if "unstructured" in spec.space.granularities:
        rows["uniform"] = [
            sizer.of_result(
                baseline(task, "uniform", target, seed=trial_seed(seed, i)), f"uniform@{target}"
            )
            for i, target in enumerate(SPARSITIES)
        ]
    if "structured" in spec.space.granularities:
        groups = channel_groups(task.model, task.example(2), forward=task.forward)
        rows["l1-uniform"] = []
        for i, ratio in enumerate(CHANNEL_SPARSITIES):
            sparsity = {g.name: ratio for g in groups}
            policy = Policy(sparsity, criterion="l1", granularity="structured")
            result = prune_and_finetune(task, policy, seed=trial_seed(seed, 100 + i))
            rows["l1-uniform"].append(sizer.of_result(result, f"l1-uniform@{ratio}"))
    return rows


def searched(spec: StudySpec, task: Task, sizer: Sizer) -> list[Point]:
    """The validation front of the spec's study (in memory), smallest first."""
    study = open_study(spec.setup(task), task, storage=None, study_name=None)
    run_worker(study, task, target=spec.trials)
    front = []
    for t in study.best_trials:
        policy = t.user_attrs["policy"]
        label = f"#{t.number} {policy.get('granularity', 'unstructured')} {policy['criterion']}"
        front.append(sizer.point(t.values[0], t.user_attrs["test_accuracy"], t.values[1], label))
    return sorted(front, key=lambda p: p["size"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--trials", type=int, help="default: the spec's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from autoprune.tasks import load_task

    spec = load_spec(args.spec)
    spec = dataclasses.replace(spec, trials=args.trials or spec.trials, seed=args.seed)
    start = time.perf_counter()
    task = spec.finetune.apply(load_task(spec.task, seed=args.seed))
    sizer = Sizer.of(spec, task)
    print(
        f"dense model ready in {time.perf_counter() - start:.1f} s; {sizer.name} {sizer.dense:g}"
    )
    start = time.perf_counter()
    rows = heuristics(spec, task, sizer, args.seed)
    print(f"heuristics: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    front = searched(spec, task, sizer)
    print(f"study: {spec.trials} trials in {time.perf_counter() - start:.1f} s")
    print(f"\n{'front trial':<28}{sizer.name:>15}{'val':>8}{'test':>8}")
    for p in front:
        print(f"{p['label']:<28}{p['size']:15.0f}{p['val']:8.4f}{p['test']:8.4f}")
    print(f"\n{'heuristic':<20}{sizer.name:>15}{'val':>8}{'test':>8}   front at <= its size")
    failures = []
    for points in rows.values():
        for h in points:
            best = max(
                (p for p in front if p["size"] <= h["size"]), key=lambda p: p["val"], default=None
            )
            line = f"{h['label']:<20}{h['size']:15.0f}{h['val']:8.4f}{h['test']:8.4f}   "
            if best is None:
                line += "none"
                failures.append(f"no front trial is as small as {h['label']}")
            else:
                line += f"{best['label']}: {best['size']:.0f} {best['val']:.4f} {best['test']:.4f}"
                if best["val"] < h["val"]:
                    failures.append(f"{h['label']} beats the front on val accuracy")
            print(line)
    ours = hypervolume(front)
    print(f"\nhypervolume (test accuracy x log10 relative size): autoprune {ours:.4f}", end="")
    for method, points in rows.items():
        theirs = hypervolume(points)
        print(f", {method} {theirs:.4f}", end="")
        if not ours > theirs:
            failures.append(f"hypervolume {ours:.4f} <= {method}'s {theirs:.4f}")
    print()
    for failure in failures:
        print(f"MISSED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
