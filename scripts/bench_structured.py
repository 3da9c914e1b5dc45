"""Is structured pruning really faster? MACs reduction against measured CPU latency.

On the built-in digits-resnet task, builds structured policies at about 1.5x, 2x and 4x fewer
MACs in two families: "channels" (one channel ratio for every channel group, L1 criterion) and
"blocks" (the identity blocks removed whole as far as the target allows, then channels).
Channel counts are multiples of ``--round-to``, so a target falls between two steps; the step
nearer to it is taken, and the MACs column shows the reduction really reached. Each policy
is fine-tuned with the task's standard recipe. Dense and pruned models are timed side by side
in the same run (interleaved repeats, medians) at batch 64 and batch 1 on 1 and 2 threads, both
in eager mode and frozen for deployment (``torch.jit.freeze`` + ``optimize_for_inference``,
which folds BatchNorm into the convolutions; applied to the dense model alike).

First it prints the multiply-add rate of dense ResNets of this shape at a few widths (random
weights, frozen, batch 64, one thread): convolution kernels slow down under about 32 channels,
which is why latency falls more slowly than MACs once pruning drives layers that narrow, and
why the task's ResNet is as wide as it is.

Exits non-zero if a frozen speedup at batch 64 falls below ``--target`` x the MACs reduction
(default 0.8). Batch 1 is dominated by per-operator overhead: reported, not checked. Timings
on a shared machine are noisy; the load average is printed before and after.

    python scripts/bench_structured.py [--repeats 30] [--target 0.8] [--round-to 16]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Sequence

import torch
from torch import nn

from autoprune import Policy, prune_and_finetune
from autoprune.measure import Context, Latency, compare_latency, macs
from autoprune.pruning.structured import (
    ChannelGroup,
    apply_plan,
    channel_groups,
    plan,
    removable_blocks,
)
from autoprune.tasks import load_task
from autoprune.tasks.resnet import ResNet
from autoprune.train import evaluate

TARGETS = (1.5, 2.0, 4.0)
SETTINGS = ((64, 1), (64, 2), (1, 1), (1, 2))  # (batch size, threads)


def policy_for(
    groups: Sequence[ChannelGroup], ratio: float, blocks: Sequence[str], round_to: int
) -> Policy:
    return Policy(
        {g.name: ratio for g in groups},
        criterion="l1",
        granularity="structured",
        round_to=round_to,
        removed_blocks=tuple(blocks),
    )


def reduction(model: nn.Module, policy: Policy, groups: Sequence[ChannelGroup]) -> float:
    example = torch.zeros(2, 1, 8, 8)
    pruned = apply_plan(copy.deepcopy(model), plan(model, policy, groups), example)
    context = Context(example[:1], ())
    return macs(model, context) / macs(pruned, context)


def choose(
    model: nn.Module, groups: Sequence[ChannelGroup], target: float, blocks: list[str], **kw: int
) -> Policy:
    """Remove the blocks in ``blocks`` while that stays under ``target``, then bisect the
    channel ratio to the rounded channel counts on either side of it and take the one whose
    MACs reduction is nearer ``target`` (by ratio: ``round_to`` makes the steps coarse)."""
    removed: list[str] = []
    for block in blocks:
        if reduction(model, policy_for(groups, 0.0, [*removed, block], **kw), groups) <= target:
            removed.append(block)
    low, high = 0.0, 0.95
    for _ in range(16):
        mid = (low + high) / 2
        if reduction(model, policy_for(groups, mid, removed, **kw), groups) < target:
            low = mid
        else:
            high = mid
    candidates = [policy_for(groups, ratio, removed, **kw) for ratio in (low, high)]
    return min(candidates, key=lambda p: abs(math.log(reduction(model, p, groups) / target)))


def frozen(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(model).eval(), batch)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def print_rates(example: torch.Tensor, repeats: int, warmup: int) -> None:
    """The dense multiply-add rate of ``ResNet(widths=(w, 2w))`` by width ``w``."""
    inputs = example[:1].expand(64, *example.shape[1:])
    settings = Latency(64, 1, repeats, warmup)
    rates = []
    for width in (8, 16, 32, 64, 96):
        model = ResNet(widths=(width, 2 * width), downsample=False).eval()
        (ms,) = compare_latency([frozen(model, inputs)], example, settings)
        rates.append(f"w={width}: {64 * macs(model, Context(example[:1], ())) / ms / 1e6:.0f}")
    print("dense ResNet(w, 2w) GMAC/s at batch 64, 1 thread, frozen: " + ", ".join(rates))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.8, help="speedup / MACs reduction")
    # oneDNN's blocked layouts hold 16 channels per block on AVX-512 (8 on AVX2), so a count
    # between multiples costs as much as the next multiple.
    parser.add_argument("--round-to", type=int, default=16, help="channel multiples")
    args = parser.parse_args()

    task = load_task("digits-resnet")
    dense = task.model.eval()
    example = task.example(2)[0]
    groups = channel_groups(dense, example)
    identity_blocks = removable_blocks(dense, example, ["stages.*.1"])
    dense_macs = macs(dense, Context(example[:1], ()))
    dense_params = sum(p.numel() for p in dense.parameters())
    print(
        f"digits-resnet dense: {dense_macs / 1e6:.2f}M MACs/image, {dense_params} params, "
        f"val/test accuracy {evaluate(dense, task, 'val')[0]:.4f}/"
        f"{evaluate(dense, task, 'test')[0]:.4f}; fine-tune {task.finetune_epochs} epochs, "
        f"lr {task.lr}; round_to {args.round_to}; {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up; torch {torch.__version__}; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print_rates(example, args.repeats, args.warmup)
    print(
        f"{'family':<8} {'target':>6} {'MACs':>6} {'params':>6} {'val':>6} {'test':>6} {'mode':<6}"
        + "".join(f" {f'b{b} t{t} dense/pruned ms':>24} {'speedup':>7}" for b, t in SETTINGS)
    )
    missed = []
    for family, blocks in (("channels", []), ("blocks", identity_blocks)):
        for target in TARGETS:
            policy = choose(dense, groups, target, blocks, round_to=args.round_to)
            result = prune_and_finetune(task, policy, seed=0)
            pruned = result.model.eval()
            macs_x = dense_macs / macs(pruned, Context(example[:1], ()))
            params_x = dense_params / sum(p.numel() for p in pruned.parameters())
            head = (
                f"{family:<8} {target:>5.1f}x {macs_x:>5.2f}x {params_x:>5.2f}x "
                f"{result.metrics['accuracy']:>6.4f} {result.metrics['test_accuracy']:>6.4f}"
            )
            for mode in ("eager", "frozen"):
                row = f"{head} {mode:<6}"
                for batch, threads in SETTINGS:
                    inputs = example[:1].expand(batch, *example.shape[1:])
                    models = [dense, pruned]
                    if mode == "frozen":
                        models = [frozen(m, inputs) for m in models]
                    settings = Latency(batch, threads, args.repeats, args.warmup)
                    dense_ms, pruned_ms = compare_latency(models, example, settings)
                    speedup = dense_ms / pruned_ms
                    row += f" {dense_ms:>11.3f}/{pruned_ms:>9.3f} ms {speedup:>6.2f}x"
                    if mode == "frozen" and batch == 64 and speedup < args.target * macs_x:
                        missed.append(
                            f"{family} {target}x (blocks {list(policy.removed_blocks)}, channel "
                            f"ratio {next(iter(policy.sparsity.values())):.3f}), {threads} "
                            f"threads: speedup {speedup:.2f}x < {args.target} x {macs_x:.2f}x"
                        )
                print(row, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for line in missed:
        print(f"MISSED: {line}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
