"""Bytes on disk of a pruned model's weights against its sparsity, on a built-in task.

Prunes the dense model of the task by magnitude (layer scope, no fine-tuning: only the zeros
matter here) at several sparsities, and writes each state dict three ways: ``torch.save``
dense, ``torch.save`` of torch's sparse COO tensors, and autoprune's format (bitmask + values,
:func:`autoprune.pruning.codec.save_state`: front weights and an export's ``model.pt``). Also
times the save and the ``weights_only`` load. Exits non-zero unless autoprune's bytes shrink with
every step of sparsity and, at 90 % sparsity, are under 30 % of the dense file.

    python scripts/bench_artifacts.py [--task digits-cnn]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

from autoprune.pruning.codec import load_state, save_state
from autoprune.pruning.masks import prunable_layers
from autoprune.pruning.policy import Policy
from autoprune.tasks import load_task
from autoprune.trial import prune_and_finetune

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)
TARGET_AT_90 = 0.30  # autoprune's bytes / dense bytes at 90 % sparsity must stay below this


def sizes(state: dict[str, torch.Tensor], directory: Path) -> dict[str, float]:
    dense, coo = io.BytesIO(), io.BytesIO()
    torch.save(state, dense)
    torch.save({k: v.to_sparse() if v.is_floating_point() else v for k, v in state.items()}, coo)
    path = directory / "w.pt"
    start = time.perf_counter()
    save_state(state, path)
    saved = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load_state(path)
    read = time.perf_counter() - start
    assert all(torch.equal(loaded[k], v) for k, v in state.items()), "round trip differs"
    return {
        "dense": len(dense.getvalue()),
        "coo": len(coo.getvalue()),
        "autoprune": path.stat().st_size,
        "save_ms": saved * 1e3,
        "load_ms": read * 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-cnn")
    args = parser.parse_args()

    task = dataclasses.replace(load_task(args.task), finetune_epochs=0)
    layers = prunable_layers(task.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in SPARSITIES:
            policy = Policy(dict.fromkeys(layers, sparsity))
            model = prune_and_finetune(task, policy, seed=0).model
            rows.append((sparsity, sizes(model.state_dict(), Path(tmp))))
    print(f"task {args.task}: whole state dict, prunable layers pruned by magnitude")
    print(f"{'sparsity':>8} {'dense B':>9} {'COO B':>9} {'ours B':>9} {'ours/dense':>10} "
          f"{'save ms':>8} {'load ms':>8}")  # fmt: skip
    for sparsity, s in rows:
        print(
            f"{sparsity:8.2f} {s['dense']:9.0f} {s['coo']:9.0f} {s['autoprune']:9.0f} "
            f"{s['autoprune'] / s['dense']:10.3f} {s['save_ms']:8.2f} {s['load_ms']:8.2f}"
        )
    ours = [s["autoprune"] for _, s in rows]
    shrinks = all(a > b for a, b in zip(ours, ours[1:], strict=False))
    at_90 = dict(rows)[0.9]
    ratio = at_90["autoprune"] / at_90["dense"]
    ok = shrinks and ratio < TARGET_AT_90
    print(
        f"{'OK' if ok else 'FAIL'}: bytes shrink with sparsity: {shrinks}; at 90 % sparsity "
        f"{ratio:.3f} of dense (target < {TARGET_AT_90})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
