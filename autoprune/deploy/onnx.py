"""The ONNX side of an export: ``model.onnx`` checked against PyTorch and measured.

``autoprune export N --format onnx`` writes the trial's model as deployed (see
:mod:`autoprune.inference`): structured models with their smaller shapes, masks folded in,
quantized models in QDQ form, a dynamic batch dimension. Before anything is written, the
fp32 graph's outputs are compared with the PyTorch model's on every validation batch and must
agree within :data:`ATOL` + :data:`RTOL` x |output|; the deployed model's validation accuracy is
compared with the trial's recorded one; and its ONNX Runtime latency is measured at batch 1
and 64, next to PyTorch's, for ``metrics.json``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoprune import measure
from autoprune.errors import DeployFailed
from autoprune.inference import OnnxModel, export_onnx
from autoprune.task import Task, logits_of
from autoprune.train import evaluate, split_batches

# How close ONNX Runtime's fp32 outputs must be to PyTorch's on the validation split.
ATOL, RTOL = 1e-4, 1e-3
# Batch sizes and threads of the latency in metrics.json.
LATENCY_BATCHES = (1, 64)
LATENCY = measure.Latency(batch_size=1, threads=1, repeats=20, warmup=3)


def compare_outputs(model: nn.Module, onnx_model: OnnxModel, task: Task) -> dict[str, float]:
    """Largest absolute difference of the logits of ``onnx_model`` from ``model``'s over the
    validation split, the fraction of samples whose top class agrees, and the worst ratio of
    a difference to its tolerance (<= 1 when within :data:`ATOL` + :data:`RTOL` x |logit|)."""
    worst = ratio = 0.0
    agree = total = 0
    cpu = torch.device("cpu")
    with torch.no_grad():
        for batch in split_batches(task, "val", cpu):
            ref = logits_of(task.forward(model, batch)).float()
            got = logits_of(task.forward(onnx_model, batch)).float()
            diff = (got - ref).abs()
            worst = max(worst, float(diff.max()))
            ratio = max(ratio, float((diff / (ATOL + RTOL * ref.abs())).max()))
            if ref.dim() >= 2:
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                total += ref[..., 0].numel()
    return {
        "max_abs_diff": worst,
        "tolerance_ratio": ratio,
        "top1_agreement": agree / total if total else float("nan"),
    }


def check_and_measure(
    model: nn.Module, deployed: OnnxModel, task: Task, recorded: float | None
) -> dict[str, Any]:
    """Check ``deployed`` (the ONNX form of the PyTorch ``model``) and measure it.

    Returns ``metrics.json``'s numbers: val and test accuracy of the deployed model, whether
    the recorded val accuracy is reproduced, the file's bytes, the fp32 graph's agreement with
    PyTorch (and the int8 one's, when quantized), and latencies.

    Raises:
        DeployFailed: If the fp32 graph's outputs are off PyTorch's by more than the tolerance.
    """
    model = model.cpu().eval()
    fp32 = deployed
    if deployed.quantization != "none":
        fp32 = export_onnx(model, task.example(2), task.forward)
    check = compare_outputs(model, fp32, task)
    if not check["tolerance_ratio"] <= 1.0:
        raise DeployFailed(
            f"ONNX Runtime's outputs differ from PyTorch's by up to {check['max_abs_diff']:.3g} "
            f"on the val split, beyond the tolerance {ATOL:g} + {RTOL:g} x |output|"
        )
    accuracy = evaluate(deployed, task, "val")[0]
    reproduced = recorded is None or accuracy == recorded  # export() warns when not
    onnx: dict[str, Any] = {
        "quantization": deployed.quantization,
        "bytes": deployed.file_bytes,
        "fp32_bytes": fp32.file_bytes,
        "fp32_check": {**check, "atol": ATOL, "rtol": RTOL},
        "latency_ms": {},
        "pytorch_latency_ms": {},
        "latency_threads": LATENCY.threads,
    }
    if deployed is not fp32:
        onnx["int8_vs_pytorch"] = compare_outputs(model, deployed, task)
    for batch in LATENCY_BATCHES:
        settings = measure.Latency(
            batch_size=batch, threads=LATENCY.threads, repeats=LATENCY.repeats
        )
        eager, ort = measure.compare_latency(
            [model, deployed], task.example(1), settings, task.forward
        )
        onnx["latency_ms"][f"batch_{batch}"] = ort
        onnx["pytorch_latency_ms"][f"batch_{batch}"] = eager
    return {
        "accuracy": accuracy,
        "test_accuracy": evaluate(deployed, task, "test")[0] if task.test is not None else None,
        "reproduced": reproduced,
        "bytes": deployed.file_bytes,
        "onnx": onnx,
    }
