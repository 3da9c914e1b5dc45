"""How a pruned model runs where it is deployed: exported to ONNX, quantized to int8 by ONNX
Runtime's quantizer, and run in ONNX Runtime behind a torch module.

``onnx`` and ``onnxruntime`` are an optional extra (``pip install 'autoprune[onnx]'``); they
are imported only when a model is deployed.
"""

from __future__ import annotations

from autoprune.inference.onnx import OnnxModel, export_onnx, require_onnx
from autoprune.inference.quantize import (
    QUANTIZATIONS,
    RUNTIMES,
    as_runtime,
    check_quantization,
    deploy,
    int8_operators,
    quantize,
)

__all__ = [
    "QUANTIZATIONS",
    "RUNTIMES",
    "OnnxModel",
    "as_runtime",
    "check_quantization",
    "deploy",
    "export_onnx",
    "int8_operators",
    "quantize",
    "require_onnx",
]
