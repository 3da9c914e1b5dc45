"""A model as ONNX: exported by ``torch.onnx``, run by ONNX Runtime behind a torch module.

:func:`export_onnx` captures how the task's ``forward`` hook calls the model on an example
batch (which positional and keyword arguments are tensors), exports that call with a dynamic
batch dimension, and returns an :class:`OnnxModel`: an ``nn.Module`` without parameters that
takes the model's own arguments, runs the graph in ONNX Runtime on the CPU and returns the
model's output structure. So every loop of autoprune (evaluation, latency) runs the deployed
graph through the same hooks as the PyTorch model.

The TorchScript exporter (``dynamo=False``) is used: on the built-in models it exports in
0.2-1 s against 3-5 s for the ``torch.export`` one, and needs no ``onnxscript``.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from autoprune.errors import DeployFailed, SpecError

logger = logging.getLogger(__name__)

# The opset written (ONNX Runtime 1.18 runs it; per-channel QDQ needs 13 or later).
OPSET = 17
# Metadata keys of a model.onnx written by autoprune: which argument each graph input fills,
# and how the graph's outputs are put back into the model's output structure.
INPUTS_KEY, OUTPUTS_KEY, QUANTIZATION_KEY = (
    "autoprune.inputs",
    "autoprune.outputs",
    "autoprune.quantization",
)

Forward = Callable[[nn.Module, Any], Any]
# Where a graph input goes: ("arg", position) or ("kwarg", name).
Slot = tuple[str, Any]


def require_onnx() -> None:
    """Raise SpecError unless ``onnx`` and ``onnxruntime`` import (the ``onnx`` extra)."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SpecError(
            f"deploying to ONNX needs {' and '.join(missing)}: pip install 'autoprune[onnx]'"
        )


def capture_call(model: nn.Module, batch: Any, forward: Forward) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, outputs)`` of the call ``forward(model, batch)`` makes to ``model``."""
    seen: list[tuple[tuple, dict]] = []

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        if not seen:
            seen.append((args, kwargs))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            outputs = forward(model, batch)
    finally:
        handle.remove()
    if not seen:
        raise DeployFailed("the task's forward hook never called the model")
    return seen[0][0], seen[0][1], outputs


def slots_of(args: tuple, kwargs: Mapping[str, Any]) -> list[Slot]:
    """The tensor arguments of a call, in graph-input order."""
    slots: list[Slot] = [("arg", i) for i, a in enumerate(args) if isinstance(a, Tensor)]
    return slots + [("kwarg", k) for k, v in kwargs.items() if isinstance(v, Tensor)]


def input_names(slots: Sequence[Slot]) -> list[str]:
    positional = [s for s in slots if s[0] == "arg"]
    return [
        str(key) if where == "kwarg" else ("input" if len(positional) == 1 else f"input_{key}")
        for where, key in slots
    ]


def feeds(slots: Sequence[Slot], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's inputs (numpy arrays by graph-input name) for a call of the model."""
    names = input_names(slots)
    values = [args[key] if where == "arg" else kwargs[key] for where, key in slots]
    return {name: v.detach().cpu().numpy() for name, v in zip(names, values, strict=True)}


class _Flat(nn.Module):
    """The model called with its tensor arguments only, returning its outputs' tensors as a
    flat tuple: the shape the TorchScript exporter wants."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, slots: list[Slot]):
        super().__init__()
        self.model, self.args, self.kwargs, self.slots = model, args, kwargs, slots

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for (where, key), tensor in zip(self.slots, tensors, strict=True):
            if where == "arg":
                args[key] = tensor
            else:
                kwargs[key] = tensor
        return tuple(pytree.tree_flatten(self.model(*args, **kwargs))[0])


def export_onnx(model: nn.Module, batch: Any, forward: Forward) -> OnnxModel:
    """``model`` (eval mode, on the CPU, fp32) exported to ONNX on the example ``batch``
    (two samples or more), with a dynamic batch dimension on every input and on every output
    whose first dimension is the batch.

    Raises:
        SpecError: If onnx or onnxruntime is not installed.
        DeployFailed: One line, if the model cannot be exported (an operator or an output
            that ONNX cannot express).
    """
    require_onnx()
    import onnx

    model = model.eval()
    args, kwargs, outputs = capture_call(model, batch, forward)
    args, kwargs, outputs = _without_targets(model, args, kwargs, outputs)
    slots = slots_of(args, kwargs)
    leaves, spec = pytree.tree_flatten(outputs)
    if not slots or not leaves or not all(isinstance(t, Tensor) for t in leaves):
        raise DeployFailed(
            "cannot export to ONNX: the model must take tensors and return tensors "
            f"(got outputs of type {type(outputs).__name__})"
        )
    names = input_names(slots)
    tensors = tuple(args[k] if w == "arg" else kwargs[k] for w, k in slots)
    rows = tensors[0].shape[0] if tensors[0].dim() else None
    outs = [f"output_{i}" for i in range(len(leaves))] if len(leaves) > 1 else ["output"]
    dynamic = {name: {0: "batch"} for name, t in zip(names, tensors, strict=True) if t.dim()}
    dynamic |= {
        name: {0: "batch"}
        for name, t in zip(outs, leaves, strict=True)
        if t.dim() and rows is not None and t.shape[0] == rows
    }
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                # In eval mode: the exporter restores the wrapper's mode afterwards, and a
                # wrapper in training mode would leave the model in training mode too.
                _Flat(model, args, kwargs, slots).eval(),
                tensors,
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter takes a file object
                dynamo=False,
                opset_version=OPSET,
                input_names=names,
                output_names=outs,
                dynamic_axes=dynamic,
            )
    except Exception as e:
        raise DeployFailed(f"cannot export to ONNX: {_first_line(e)}") from e
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {INPUTS_KEY: json.dumps(slots)}
    try:
        meta[OUTPUTS_KEY] = pytree.treespec_dumps(spec)
    except Exception:  # an output type pytree cannot serialize: outputs come back flat
        logger.debug("output structure %s not serializable; kept in memory only", spec)
    onnx.helper.set_model_props(proto, meta)
    return OnnxModel(compact(proto).SerializeToString(), spec=spec)


def compact(proto: Any) -> Any:
    """``proto`` (changed in place) with short names for its inner values and nodes and no
    shape annotations of inner values: the exporter's and quantizer's names
    (``/model/features/features.0/Conv_output_0_QuantizeLinear``) take several kB, as much
    as the weights of a small pruned model in int8. Graph inputs and outputs keep their names;
    ONNX Runtime infers the shapes again when it loads the model."""
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        return names.setdefault(name, format(len(names), "x"))

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
        tensor.doc_string = ""
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]
    return proto


# Keyword arguments that carry targets (a Hugging Face model computes its loss from them): a
# deployed model is called without them.
TARGET_KWARGS = ("labels", "label")


def _without_targets(model: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> tuple:
    """The call without its target keywords, when the model takes it (its loss is then
    computed by the task from the logits); else the call as it was."""
    kept = {k: v for k, v in kwargs.items() if k not in TARGET_KWARGS}
    if len(kept) == len(kwargs):
        return args, kwargs, outputs
    try:
        with torch.no_grad():
            return args, kept, model(*args, **kept)
    except Exception:  # a model that needs its targets: exported with them
        return args, kwargs, outputs


class OnnxModel(nn.Module):
    """An ONNX graph run by ONNX Runtime on the CPU, called like the model it was exported
    from (the same positional and keyword arguments, the same output structure).

    ONNX Runtime's session runs on as many threads as torch has at the call
    (``torch.get_num_threads()``), so that a latency measurement's thread setting holds for
    it too; one session is kept per thread count.

    Args:
        data: The serialized ONNX model (a ``model.onnx``'s bytes).
        spec: The output structure (default: the one stored in the model, else a tensor for
            one output and a tuple for several).
    """

    def __init__(self, data: bytes, *, spec: pytree.TreeSpec | None = None):
        super().__init__()
        require_onnx()
        import onnx

        self.data = bytes(data)
        try:
            proto = onnx.load_from_string(self.data)
        except Exception as e:
            raise DeployFailed(f"not an ONNX model: {_first_line(e)}") from e
        meta = {p.key: p.value for p in proto.metadata_props}
        graph_inputs = [i.name for i in proto.graph.input]
        initializers = {i.name for i in proto.graph.initializer}
        graph_inputs = [name for name in graph_inputs if name not in initializers]
        if INPUTS_KEY in meta:
            self.slots: list[Slot] = [tuple(s) for s in json.loads(meta[INPUTS_KEY])]  # type: ignore[misc]
        else:  # a graph autoprune did not write: its inputs by position
            self.slots = [("arg", i) for i in range(len(graph_inputs))]
        if spec is None and OUTPUTS_KEY in meta:
            try:
                spec = pytree.treespec_loads(meta[OUTPUTS_KEY])
            except Exception:
                spec = None
        self.spec = spec
        self.quantization = meta.get(QUANTIZATION_KEY, "none")
        self.input_names = graph_inputs
        self._sessions: dict[int, Any] = {}

    @property
    def file_bytes(self) -> int:
        """Bytes of the serialized model: the size of its ``model.onnx``."""
        return len(self.data)

    def session(self, threads: int | None = None) -> Any:
        """The ONNX Runtime session on ``threads`` intra-op threads (default: torch's)."""
        import onnxruntime as ort

        threads = threads or torch.get_num_threads()
        if threads not in self._sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            try:
                self._sessions[threads] = ort.InferenceSession(
                    self.data, options, providers=["CPUExecutionProvider"]
                )
            except Exception as e:
                raise DeployFailed(f"ONNX Runtime cannot load the model: {_first_line(e)}") from e
        return self._sessions[threads]

    def feed(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """ONNX Runtime's inputs (numpy arrays by graph-input name) for a call of the model."""
        values = feeds(self.slots, args, kwargs).values()
        return dict(zip(self.input_names, values, strict=True))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        feed = self.feed(args, kwargs)
        outputs = [torch.from_numpy(o) for o in self.session().run(None, feed)]
        if self.spec is not None:
            return pytree.tree_unflatten(outputs, self.spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __getstate__(self) -> dict[str, Any]:  # sessions do not pickle or deepcopy
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
