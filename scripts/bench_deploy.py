"""Pruned and quantized together: how small, how accurate, how fast where it runs?

For digits-cnn, digits-mlp and digits-resnet, runs a structured study that searches
quantization (``none``, ``int8-dynamic``, ``int8-static``; objectives accuracy and deployed
bytes, the default warm starts with their "prune then int8" versions), then takes the knee and
the smallest model of its front. Each is replayed (exactly: the replay must give the recorded
accuracy and bytes, or the bench exits 1) and measured in four forms, timed side by side
(interleaved repeats, medians, one thread) at batch 1 and 64 with the dense fp32 model:

- ``pytorch``: the pruned fp32 model in eager PyTorch (its file: autoprune's ``model.pt``);
- ``ort-fp32``: the same exported to ONNX, in ONNX Runtime;
- ``ort-int8``: its int8 form in ONNX Runtime (the trial's own quantization, or static int8
  for a trial that chose none);
- and the dense model in the first two forms (``dense`` rows).

Targets (issue 13), checked per task:

1. some front model is at least 10x smaller on disk (its deployed file) than the dense fp32
   ``torch.save`` file, with test accuracy within 1 point of the dense model's;
2. the int8 form is faster than fp32 in ONNX Runtime at batch 64 (for the picked models).

Exits 1 when a target is missed. About 15 minutes on a loaded 2-core machine.

    python scripts/bench_deploy.py [--trials 30 30 16] [--tasks digits-cnn ...] [--repeats 30]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import optuna
import torch
from torch import nn

import autoprune
from autoprune.inference import deploy, export_onnx
from autoprune.measure import Latency, compare_latency
from autoprune.pruning.codec import exported_bytes
from autoprune.study.front import front_trials
from autoprune.study.study import replay
from autoprune.study.trial_metrics import metric_names, trial_metrics
from autoprune.tasks import load_task
from autoprune.train import evaluate

QUANTIZATIONS = ("none", "int8-dynamic", "int8-static")
SPACES = {
    "digits-cnn": autoprune.SearchSpace(
        granularities=["structured"], channel_criteria=["l1", "fpgm", "taylor"],
        scopes=["layer"], rules=["ratio"], channel_sparsity=(0.0, 0.8),
        quantizations=QUANTIZATIONS,
    ),
    "digits-mlp": autoprune.SearchSpace(
        granularities=["structured"], channel_criteria=["l1", "fpgm", "taylor"],
        scopes=["layer"], rules=["ratio"], channel_sparsity=(0.0, 0.8),
        quantizations=QUANTIZATIONS,
    ),
    "digits-resnet": autoprune.SearchSpace(
        granularities=["structured"], channel_criteria=["l1", "bn_scale", "taylor"],
        scopes=["layer"], rules=["ratio"], channel_sparsity=(0.0, 0.8), round_to=16,
        blocks=["stages.*.1"], quantizations=QUANTIZATIONS,
    ),
}  # fmt: skip
DEFAULT_TRIALS = {"digits-cnn": 30, "digits-mlp": 30, "digits-resnet": 16}
BATCHES = (1, 64)


def torch_file_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def run_study(name: str, trials: int) -> tuple[optuna.Study, autoprune.Task]:
    task = load_task(name)
    start = time.perf_counter()
    study = autoprune.search(
        task, n_trials=trials, space=SPACES[name], objectives=["accuracy", "bytes"], seed=0
    )
    states = [t.state.name.lower() for t in study.trials]
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    print(
        f"{name}: {trials} trials in {time.perf_counter() - start:.0f} s "
        f"({states.count('complete')} complete, {len(failed)} failed"
        + (f": {failed[0].user_attrs.get('fail_reason')}" if failed else "")
        + f"), front {len(front_trials(study))}"
    )
    return study, task


def forms(task: autoprune.Task, model: nn.Module, int8: str) -> dict[str, tuple[nn.Module, int]]:
    """The model in eager PyTorch, in ONNX Runtime fp32 and in its int8 form, with the bytes
    of each one's file."""
    fp32 = export_onnx(model.cpu().eval(), task.example(2), task.forward)
    quantized = deploy(model, task, int8)
    return {
        "pytorch": (model, exported_bytes(model)),
        "ort-fp32": (fp32, fp32.file_bytes),
        f"ort-{int8}": (quantized, quantized.file_bytes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(SPACES))
    parser.add_argument("--trials", nargs="+", type=int, help="per task (default 30 30 16)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    trials = dict(
        zip(args.tasks, args.trials or [DEFAULT_TRIALS[t] for t in args.tasks], strict=True)
    )
    print(f"load average {os.getloadavg()[0]:.2f}; one thread; torch {torch.__version__}")
    missed: list[str] = []
    for name in args.tasks:
        study, task = run_study(name, trials[name])
        dense = task.model.eval()
        dense_file = torch_file_bytes(dense)
        dense_test = evaluate(dense, task, "test")[0]
        dense_val = evaluate(dense, task, "val")[0]
        names = metric_names(study)
        front = [(t, trial_metrics(t, names)) for t in front_trials(study)]
        small = [
            (t.number, m["bytes"], m["test_accuracy"])
            for t, m in front
            if dense_file / m["bytes"] >= 10 and m["test_accuracy"] >= dense_test - 0.01
        ]
        print(
            f"dense: val {dense_val:.4f}, test {dense_test:.4f}, torch.save {dense_file} B; "
            f"front trials >= 10x smaller within 1 point (test): "
            + (", ".join(f"#{n} ({dense_file / b:.1f}x, {a:.4f})" for n, b, a in small) or "none")
        )
        if not small:
            missed.append(f"{name}: no front model 10x smaller within 1 point of dense")
        knee = autoprune.pick(study, knee=True)
        smallest = min(front, key=lambda p: (p[1]["bytes"], p[0].number))[0]
        picked = {"knee": knee} | (
            {"smallest": smallest} if smallest.number != knee.number else {}
        )
        rows, models = [], []
        dense_forms = forms(task, dense, "int8-static")
        for form in ("pytorch", "ort-fp32"):
            rows.append(("dense", form, dense_forms[form][1], dense_val, dense_test))
            models.append(dense_forms[form][0])
        for label, trial in picked.items():
            result = replay(task, trial)
            recorded = trial.values
            assert result.deployed is not None
            if (result.metrics["accuracy"], result.deployed.file_bytes) != tuple(recorded):
                missed.append(f"{name}: trial {trial.number} did not replay exactly")
            q = result.policy.quantization
            int8 = q if q != "none" else "int8-static"
            print(
                f"{label}: trial {trial.number} ({q}, deployed {result.deployed.file_bytes} B, "
                f"{dense_file / result.deployed.file_bytes:.1f}x smaller than dense fp32, "
                f"val {recorded[0]:.4f}): {result.policy.to_json()[:160]}..."
            )
            for form, (model, size) in forms(task, result.model, int8).items():
                val = evaluate(model, task, "val")[0]
                test = evaluate(model, task, "test")[0]
                rows.append((f"{label} #{trial.number}", form, size, val, test))
                models.append(model)
        times = {}
        for batch in BATCHES:
            settings = Latency(batch_size=batch, threads=1, repeats=args.repeats, warmup=3)
            times[batch] = compare_latency(models, task.example(1), settings, task.forward)
        print(
            f"{'model':16} {'form':18} {'bytes':>9} {'x dense':>8} {'val':>7} {'test':>7} "
            + " ".join(f"{'ms@' + str(b):>8}" for b in BATCHES)
        )
        for i, (who, form, size, val, test) in enumerate(rows):
            print(
                f"{who:16} {form:18} {size:9d} {dense_file / size:7.1f}x {val:7.4f} {test:7.4f} "
                + " ".join(f"{times[b][i]:8.3f}" for b in BATCHES)
            )
        for i, (who, form, *_rest) in enumerate(rows):
            if form.startswith("ort-int8") and not times[64][i] < times[64][i - 1]:
                missed.append(
                    f"{name}: {who} int8 {times[64][i]:.3f} ms not faster than ONNX Runtime "
                    f"fp32 {times[64][i - 1]:.3f} ms at batch 64"
                )
        print()
    print(f"load average {os.getloadavg()[0]:.2f}")
    for line in missed:
        print(f"bench_deploy: MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
