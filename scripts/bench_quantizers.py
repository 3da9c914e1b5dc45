"""Which int8 implementation gives real speed on this CPU? Three candidates, side by side.

On the dense digits-cnn and digits-resnet models, each of:

- ``torch.ao`` (PyTorch's own quantized kernels, x86 backend): ``quantize_dynamic`` of the
  Linear layers, and FX graph mode static quantization with ``get_default_qconfig_mapping("x86")``
  (per-channel weights, calibrated on training batches); run in eager PyTorch.
- ``torchao`` (if importable; ``pip install torchao``): ``Int8DynamicActivationInt8WeightConfig``
  in eager PyTorch and under ``torch.compile``, and static PT2E quantization with the
  ``X86InductorQuantizer`` under ``torch.compile`` (compile time printed).
- ONNX Runtime's quantizer on the exported graph: ``quantize_dynamic`` and ``quantize_static``
  (QDQ, per-channel int8 weights, uint8 activations calibrated on training batches); run in
  ONNX Runtime.

prints val accuracy, serialized bytes, and milliseconds per batch at batch 1 and 64 on one
thread (median of ``--repeats`` after warm-up), next to fp32 eager PyTorch and fp32 ONNX
Runtime. Timings on a shared machine are noisy; the load average is printed.

    python scripts/bench_quantizers.py [--repeats 30] [--tasks digits-cnn digits-resnet]
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoprune.tasks import load_task
from autoprune.train import evaluate

CALIBRATION_BATCHES = 8
Runner = Callable[[torch.Tensor], torch.Tensor]


def timed(run: Runner, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def accuracy(run: Runner, task) -> float:  # type: ignore[no-untyped-def]
    correct = total = 0
    for x, y in task.batches("val"):
        correct += int((run(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def calibration(task) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    batches = itertools.islice(task.batches("train"), CALIBRATION_BATCHES)
    return [x for x, _ in batches]


def torch_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def eager(model: nn.Module) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def torch_ao(model: nn.Module, task, static: bool) -> nn.Module:  # type: ignore[no-untyped-def]
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    model = copy.deepcopy(model).eval()
    if not static:
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    example = task.example(1)[0]
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
    with torch.inference_mode():
        for x in calibration(task):
            prepared(x)
    return convert_fx(prepared)


def torchao_runs(model: nn.Module, task) -> dict[str, tuple[Runner, int, float]]:  # type: ignore[no-untyped-def]
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        print(f"  torchao: not importable ({e}); skipped")
        return {}
    runs: dict[str, tuple[Runner, int, float]] = {}
    dynamic = copy.deepcopy(model).eval()
    quantize_(dynamic, Int8DynamicActivationInt8WeightConfig())
    runs["torchao dynamic eager"] = (eager(dynamic), torch_bytes(dynamic), 0.0)
    start = time.perf_counter()
    compiled = torch.compile(dynamic, dynamic=True)
    eager(compiled)(task.example(64)[0])
    runs["torchao dynamic compiled"] = (
        eager(compiled),
        torch_bytes(dynamic),
        time.perf_counter() - start,
    )
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        print(f"  torchao static: not importable ({e}); skipped")
        return runs
    start = time.perf_counter()
    example = task.example(2)[0]
    batch = torch.export.Dim("batch")
    exported = torch.export.export(
        copy.deepcopy(model).eval(), (example,), dynamic_shapes=({0: batch},)
    ).module()
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config()
    )
    try:
        prepared = prepare_pt2e(exported, quantizer)
    except Exception as e:  # a pattern the quantizer cannot take: say so, go on
        print(f"  torchao static: {type(e).__name__}: {e}")
        return runs
    for x in calibration(task):
        prepared(x)
    converted = convert_pt2e(prepared)
    with torch.no_grad():
        static = torch.compile(converted, dynamic=True)
        static(task.example(64)[0])
    runs["torchao static compiled"] = (
        lambda x: static(x),
        torch_bytes(converted),
        time.perf_counter() - start,
    )
    return runs


def onnx_runs(model: nn.Module, task, folder: Path) -> dict[str, tuple[Runner, int, float]]:  # type: ignore[no-untyped-def]
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    fp32 = folder / "fp32.onnx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (task.example(1)[0],),
            str(fp32),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    export_s = time.perf_counter() - start

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration(task))

        def get_next(self):  # type: ignore[no-untyped-def]
            x = next(self.batches, None)
            return None if x is None else {"input": x.numpy()}

    paths = {"onnxruntime fp32": (fp32, export_s)}
    start = time.perf_counter()
    quantize_dynamic(fp32, folder / "dyn.onnx", weight_type=QuantType.QInt8, per_channel=True)
    paths["onnxruntime dynamic"] = (folder / "dyn.onnx", time.perf_counter() - start + export_s)
    for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
        start = time.perf_counter()
        out = folder / f"static-{fmt.name}.onnx"
        quantize_static(
            fp32,
            out,
            Reader(),
            quant_format=fmt,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        paths[f"onnxruntime static {fmt.name}"] = (out, time.perf_counter() - start + export_s)
    runs: dict[str, tuple[Runner, int, float]] = {}
    for name, (path, seconds) in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor, session: ort.InferenceSession = session) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

        runs[name] = (run, path.stat().st_size, seconds)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tasks", nargs="+", default=["digits-cnn", "digits-resnet"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, one thread")
    for name in args.tasks:
        task = load_task(name)
        model = task.model.eval()
        x1, x64 = task.example(1)[0], task.example(64)[0]
        runs: dict[str, tuple[Runner, int, float]] = {
            "pytorch fp32 eager": (eager(model), torch_bytes(model), 0.0)
        }
        for static in (False, True):
            start = time.perf_counter()
            quantized = torch_ao(model, task, static)
            label = f"torch.ao {'static fx' if static else 'dynamic'}"
            runs[label] = (eager(quantized), torch_bytes(quantized), time.perf_counter() - start)
        runs |= torchao_runs(model, task)
        with tempfile.TemporaryDirectory() as tmp:
            runs |= onnx_runs(model, task, Path(tmp))
            dense_acc = evaluate(model, task, "val")[0]
            print(f"\n{name}: dense val accuracy {dense_acc:.4f}")
            print(
                f"{'implementation':28} {'val acc':>8} {'bytes':>9} {'make s':>7} "
                f"{'ms@1':>7} {'ms@64':>7} {'x fp32@64':>9}"
            )
            base64 = None
            for label, (run, size, seconds) in runs.items():
                ms1, ms64 = timed(run, x1, args.repeats), timed(run, x64, args.repeats)
                base64 = base64 or ms64
                print(
                    f"{label:28} {accuracy(run, task):8.4f} {size:9d} {seconds:7.2f} "
                    f"{ms1:7.3f} {ms64:7.3f} {base64 / ms64:8.2f}x"
                )
    print(f"\nload average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
