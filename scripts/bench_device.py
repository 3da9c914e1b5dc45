"""Where one trial's time and memory go on a device: the built-in transformer task by default.

Runs a few trials of the search's own objective (the study's setup, sampler-free: fixed
policies, one unstructured and one structured when the task has channel groups) on the chosen
device and splits each trial's wall time into its phases (``scoring``, ``masking`` or
``pruning``, ``finetuning``, ``evaluation``, from the trial's ``timings``), the size objectives
(``measuring``) and what is left (``overhead``: copying the model, moving it to the device,
bookkeeping). Memory: on a GPU the peak bytes allocated during the trial, against the model's
weight bytes; on the CPU the growth of the process's peak resident memory.

Fails (exit 1) when the overhead is more than ``--max-overhead`` of a trial's time (after the
first trial, which warms up), or, on a GPU, when a trial holds more than two copies of the
model's weights beyond what training itself needs (gradients and two Adam moments: four more
weight-sized tensors, plus the calibration gradients kept for the study).

    python scripts/bench_device.py [--task digits-bert] [--device auto] [--trials 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from typing import Any

import torch

from autoprune import devices, measure
from autoprune.pruning.policy import Policy
from autoprune.study.setup import make_setup
from autoprune.study.space import SearchSpace
from autoprune.tasks import TASKS, load_task
from autoprune.trial import dense_on_device, prune_and_finetune

PHASES = ("scoring", "masking", "pruning", "finetuning", "evaluation")


def policies(task: Any) -> list[tuple[str, Policy, tuple[str, ...]]]:
    """An unstructured policy (magnitude, 70% everywhere) and, when the task's model has
    channel groups, a structured one (L1, 50% of every group)."""
    setup = make_setup(task, warm_start=None)
    chosen = [("unstructured 70%", Policy(dict.fromkeys(setup.layers, 0.7)), setup.layers)]
    try:
        structured = make_setup(
            task, warm_start=None, space=SearchSpace(granularities=["structured"])
        )
    except Exception as e:  # noqa: BLE001 - a model without channel groups: say so, go on
        print(f"(no structured policy: {e})")
        return chosen
    policy = Policy(
        dict.fromkeys(structured.groups, 0.5), criterion="l1", granularity="structured"
    )
    chosen.append(("structured 50%", policy, structured.layers))
    return chosen


def run_trial(task: Any, policy: Policy, layers: tuple[str, ...], seed: int) -> dict[str, float]:
    device = task.torch_device
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with devices.peak_memory(device) as peak:
        start = time.perf_counter()
        result = prune_and_finetune(task, policy, seed=seed, count=layers)
        measured = time.perf_counter()
        context = measure.Context(task.example(1), layers, forward=task.forward)
        measure.measure(result.model, ["accuracy", "nonzero_params", "macs"], context)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
    row = {phase: result.timings.get(phase, 0.0) for phase in PHASES}
    row["measuring"] = end - measured
    row["total"] = end - start
    row["overhead"] = row["total"] - sum(row[p] for p in (*PHASES, "measuring"))
    row["accuracy"] = result.metrics["accuracy"]
    row["peak_bytes"] = float(peak.get("peak_bytes", 0))
    row["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", default="digits-bert" if "digits-bert" in TASKS else "digits-cnn"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--max-overhead", type=float, default=0.10)
    args = parser.parse_args(argv)

    task = dataclasses.replace(load_task(args.task), device=args.device, precision=args.precision)
    device = task.torch_device
    weights = sum(p.numel() * p.element_size() for p in task.model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"task {args.task}: {weights / 1e6:.2f} MB of weights; device {device} ({name}); "
        f"precision {args.precision}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    # The study computes calibration gradients once, on a device copy of the dense model.
    dense_on_device(task)
    failed = False
    for label, policy, layers in policies(task):
        rows = [run_trial(task, policy, layers, seed) for seed in range(args.trials)]
        print(f"\n{label}: {args.trials} trials, seconds (median of trials 2..{args.trials})")
        steady = rows[1:] or rows
        header = ["phase", *(f"trial {i + 1}" for i in range(len(rows))), "median", "share"]
        print(" | ".join(f"{h:>12}" for h in header))
        total = statistics.median(r["total"] for r in steady)
        for key in (*PHASES, "measuring", "overhead", "total"):
            if all(r[key] == 0 for r in rows) and key != "overhead":
                continue
            median = statistics.median(r[key] for r in steady)
            cells = [f"{r[key]:.3f}" for r in rows] + [f"{median:.3f}", f"{median / total:.1%}"]
            print(" | ".join(f"{c:>12}" for c in [key, *cells]))
        share = statistics.median(r["overhead"] / r["total"] for r in steady)
        accuracy = ", ".join(f"{r['accuracy']:.4f}" for r in rows)
        print(
            f"val accuracy: {accuracy}; overhead share {share:.1%} (limit {args.max_overhead:.0%})"
        )
        if share > args.max_overhead:
            print("FAIL: overhead share over the limit")
            failed = True
        if device.type == "cuda":
            peak = max(r["peak_bytes"] for r in rows)
            # model + gradients + 2 Adam moments + kept calibration gradients + one more copy
            budget = 6 * weights
            print(f"peak GPU memory {peak / 1e6:.1f} MB = {peak / weights:.2f}x the weights")
            if peak > budget + 256e6:  # activations of a small batch fit in 256 MB
                print(f"FAIL: peak over {budget / 1e6:.1f} MB + 256 MB of activations")
                failed = True
        else:
            growth = max(r["rss_growth_mb"] for r in rows)
            print(f"CPU: peak resident memory grew by at most {growth:.1f} MB in a trial")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
