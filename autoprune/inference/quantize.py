"""int8 quantization of a pruned model, by ONNX Runtime's quantizer on the exported graph.

Why ONNX Runtime's quantizer (measured by ``scripts/bench_quantizers.py``, one thread, batch
64, against fp32 eager PyTorch): on digits-resnet static int8 in ONNX Runtime ran 4.2x faster
(torch.ao's x86 FX path 3.0x, torchao's PT2E x86 quantizer failed on the residual blocks,
torchao's dynamic int8 gained nothing without ``torch.compile``, and 1.5x with it after 19 s of
compiling); on digits-cnn and digits-mlp too it was the fastest int8 form. It is also the
only one whose quantized model is the file users deploy (``model.onnx``), so a trial measures
exactly what is exported; torch.ao's quantization is deprecated in torch 2.13.

- ``int8-static``: QDQ format, per-channel int8 weights, uint8 activations calibrated (min/max)
  on the task's first ``calibration_batches`` training batches, in order: deterministic.
- ``int8-dynamic``: int8 weights of MatMul/Gemm (Linear), LSTM, GRU and attention operators;
  activations quantized at run time. Convolutions stay fp32 (ONNX Runtime's dynamic ConvInteger
  ran 3x slower than fp32 on digits-resnet).

A quantization that leaves no operator in int8 fails (:class:`DeployFailed`): the trial that
asked for it fails alone, with that reason.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from autoprune.errors import DeployFailed, SpecError
from autoprune.inference.onnx import (
    QUANTIZATION_KEY,
    OnnxModel,
    capture_call,
    compact,
    export_onnx,
    require_onnx,
)
from autoprune.pruning.policy import QUANTIZATIONS, RUNTIMES
from autoprune.task import Task

# The operators each quantization turns int8; a model with none of them cannot take it.
_DYNAMIC_OPS = ("MatMul", "Gemm", "LSTM", "GRU", "Attention")
_INT8_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "QAttention", "QGemm"}


def check_quantization(name: str) -> str:
    """Return ``name`` if it is a known quantization, else raise SpecError naming it."""
    if name not in QUANTIZATIONS:
        raise SpecError(f"unknown quantization {name!r} (known: {', '.join(QUANTIZATIONS)})")
    return name


def deploy(model: nn.Module, task: Task, quantization: str = "none") -> OnnxModel:
    """``model`` as deployed: exported to ONNX (a copy on the CPU, eval mode) and quantized
    by ``quantization``, ready to run in ONNX Runtime.

    Raises:
        SpecError: If onnx or onnxruntime is missing, or ``quantization`` is unknown.
        DeployFailed: One line, if the model cannot be exported or quantized as asked.
    """
    check_quantization(quantization)
    require_onnx()
    model = _cpu_copy(model)
    exported = export_onnx(model, task.example(2), task.forward)
    if quantization == "none":
        return exported
    data = quantize(exported.data, quantization, _calibration(model, task, exported))
    return OnnxModel(data, spec=exported.spec)


def quantize(data: bytes, quantization: str, calibration: Iterable[dict[str, Any]] = ()) -> bytes:
    """The ONNX model ``data`` quantized by ``quantization`` (see the module doc); static
    quantization calibrates on ``calibration`` (ONNX Runtime feeds, one per batch).

    Raises:
        DeployFailed: If the quantizer fails, or leaves no operator in int8.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    check_quantization(quantization)
    if quantization == "none":
        return data
    proto = onnx.load_from_string(data)
    batches = iter(calibration)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, Any] | None:
            return next(batches, None)

    with tempfile.TemporaryDirectory(prefix="autoprune-quantize-") as tmp, _quiet():
        out = Path(tmp) / "model.onnx"
        try:
            if quantization == "int8-dynamic":
                quantize_dynamic(
                    proto,
                    out,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=list(_DYNAMIC_OPS),
                )
            else:
                quantize_static(
                    proto,
                    out,
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
            quantized = onnx.load(str(out))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise DeployFailed(f"{quantization} quantization failed: {first}") from e
    if not int8_operators(quantized):
        what = (
            "MatMul/Gemm (Linear), LSTM, GRU or attention"
            if quantization == "int8-dynamic"
            else "convolution, MatMul/Gemm or pooling"
        )
        raise DeployFailed(
            f"{quantization} quantized no operator of this model (ONNX Runtime's quantizer "
            f"takes {what} operators)"
        )
    meta = {p.key: p.value for p in proto.metadata_props} | {QUANTIZATION_KEY: quantization}
    del quantized.metadata_props[:]
    onnx.helper.set_model_props(quantized, meta)
    return bytes(compact(quantized).SerializeToString())


def int8_operators(proto: Any) -> int:
    """How many operators of an ONNX model compute in int8: integer operators, or (QDQ) the
    operators fed by a DequantizeLinear of an int8 weight initializer."""
    initializers = {i.name for i in proto.graph.initializer}
    dequantized_weights = {
        node.output[0]
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers
    }
    return sum(
        node.op_type in _INT8_OPS
        or node.op_type.startswith("QLinear")
        or (node.op_type != "DequantizeLinear" and bool(dequantized_weights & set(node.input)))
        for node in proto.graph.node
    )


def _calibration(model: nn.Module, task: Task, exported: OnnxModel) -> Iterator[dict[str, Any]]:
    """ONNX Runtime feeds of the task's first ``calibration_batches`` training batches, in
    order (unshuffled: the same calibration at every replay)."""
    for i, batch in enumerate(task.batches("train")):
        if i >= task.calibration_batches:
            return
        args, kwargs, _ = capture_call(model, batch, task.forward)
        yield exported.feed(args, kwargs)


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` in eval mode and fp32 (the model itself is left as it is)."""
    copied = copy.deepcopy(model).cpu().float()
    return copied.eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice ("consider pre-processing") on the root logger
    at WARNING for every model: lift the root's level while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def as_runtime(quantizations: Iterable[str]) -> str:
    """The runtime whose numbers a study with these quantizations searches: ONNX Runtime as
    soon as one quantizes, so that every trial of it is measured alike."""
    return "onnxruntime" if any(q != "none" for q in quantizations) else "pytorch"


__all__ = [
    "QUANTIZATIONS",
    "RUNTIMES",
    "as_runtime",
    "check_quantization",
    "deploy",
    "int8_operators",
    "quantize",
]
