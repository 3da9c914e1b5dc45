"""Size objectives: how big, heavy or slow a pruned model is. Smaller is better for all.

A trial deployed to ONNX Runtime (see :mod:`autoprune.inference`) is measured as deployed:
``bytes`` is its ``model.onnx`` file, ``latency_ms`` its time in ONNX Runtime.

Each objective is a function ``(model, context) -> float`` in a name → objective registry, so
that a study spec chooses its objectives by name: ``objectives = ["accuracy", "macs"]``.
Validation accuracy is always the first objective (maximised); one or two size objectives
follow (minimised).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoprune import devices
from autoprune._registry import Registry, from_dict, to_dict
from autoprune.errors import SpecError
from autoprune.inference import OnnxModel
from autoprune.pruning.codec import exported_bytes
from autoprune.pruning.masks import PRUNABLE_TYPES

ACCURACY = "accuracy"
DEFAULT_OBJECTIVES = (ACCURACY, "nonzero_params")


@dataclasses.dataclass(frozen=True)
class Latency:
    """How latency is measured: the median of ``repeats`` timed forward passes of a batch of
    ``batch_size`` on ``threads`` CPU threads, after ``warmup`` untimed passes."""

    batch_size: int = 64
    threads: int = 1
    repeats: int = 20
    warmup: int = 3

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value, low = getattr(self, field.name), 0 if field.name == "warmup" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SpecError(f"latency {field.name} must be an integer >= {low}, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Latency:
        return from_dict(cls, data, "latency key")


def _call(model: nn.Module, batch: Any) -> Any:
    return model(batch)


@dataclasses.dataclass(frozen=True)
class Context:
    """What a measurement needs besides the model.

    Args:
        example: One sample as a batch of one (a tensor ``[1, ...]``, or any batch structure
            that ``forward`` takes, e.g. a Hugging Face dict), on the CPU.
        layers: The layers whose weights ``nonzero_params`` counts (missing ones count 0).
        latency: How ``latency_ms`` is measured.
        forward: ``forward(model, batch)``, the task's hook; by default ``model(batch)``.
    """

    example: Any
    layers: tuple[str, ...]
    latency: Latency = dataclasses.field(default_factory=Latency)
    forward: Callable[[nn.Module, Any], Any] = _call


MeasureFn = Callable[[nn.Module, Context], float]


@dataclasses.dataclass(frozen=True)
class SizeObjective:
    """A named size measurement; ``sees_zeros``: unstructured zeros make it smaller;
    ``sees_quantization``: an int8 model measures smaller than its fp32 form."""

    name: str
    measure: MeasureFn
    sees_zeros: bool
    sees_quantization: bool = False


# The size objectives; accuracy is not one of them (it is measured by the task).
OBJECTIVES: Registry[SizeObjective] = Registry("objective")


def register_objective(
    name: str, *, sees_zeros: bool, sees_quantization: bool = False
) -> Callable[[MeasureFn], MeasureFn]:
    """Decorator that adds a size measurement to the registry under ``name``."""

    def decorator(fn: MeasureFn) -> MeasureFn:
        if name == ACCURACY:
            raise SpecError(f"objective {name!r} is already registered")
        OBJECTIVES.register(name, SizeObjective(name, fn, sees_zeros, sees_quantization))
        return fn

    return decorator


def check_objectives(names: Sequence[str]) -> tuple[str, ...]:
    """Validate a study's objective names: "accuracy" first, then one or two size objectives.

    Raises:
        SpecError: Naming the bad value.
    """
    if isinstance(names, str) or not names or names[0] != ACCURACY:
        raise SpecError(f"objectives must be a list starting with 'accuracy', got {names!r}")
    sizes = list(names[1:])
    if not 1 <= len(sizes) <= 2 or len(set(sizes)) != len(sizes):
        raise SpecError(
            f"objectives must add one or two distinct size objectives to 'accuracy', got {names!r}"
        )
    for name in sizes:
        if name not in OBJECTIVES:
            raise SpecError(
                f"unknown objective {name!r} (known: {', '.join([ACCURACY, *OBJECTIVES])})"
            )
    return tuple(names)


def check_granularities(objectives: Sequence[str], granularities: Sequence[str]) -> None:
    """Refuse unstructured pruning in a study whose size objective ignores zeros in weights.

    Raises:
        SpecError: Naming the objective, e.g. ``macs`` or ``latency_ms``.
    """
    if "unstructured" not in granularities:
        return
    for name in objectives:
        if name in OBJECTIVES and not OBJECTIVES[name].sees_zeros:
            raise SpecError(
                f"objective {name!r} is blind to unstructured zeros: "
                'search granularities = ["structured"] with it'
            )


def check_quantizations(
    objectives: Sequence[str], quantizations: Sequence[str], granularities: Sequence[str]
) -> None:
    """Refuse a study that searches quantization with a size objective blind to it, or with
    unstructured pruning: such a study deploys every trial to ONNX Runtime, whose files and
    kernels are dense, so zeros save neither bytes nor time there.

    Raises:
        SpecError: Naming the objective or the granularity.
    """
    searched = [q for q in quantizations if q != "none"]
    if not searched:
        return
    for name in objectives:
        if name in OBJECTIVES and not OBJECTIVES[name].sees_quantization:
            able = [n for n, o in OBJECTIVES.items() if o.sees_quantization]
            raise SpecError(
                f"objective {name!r} is blind to quantization: search quantizations "
                f"{list(quantizations)} with {' or '.join(able)}"
            )
    if "unstructured" in granularities:
        raise SpecError(
            f"quantizations {list(quantizations)} deploy to ONNX Runtime, whose dense files and "
            'kernels gain nothing from unstructured zeros: search granularities = ["structured"]'
        )


def directions(
    names: Sequence[str], higher_is_better: bool = True
) -> list[Literal["maximize", "minimize"]]:
    """Optuna directions of the objectives ``names``: accuracy up (down for a task whose
    score is better lower, e.g. perplexity), every size down."""
    best: Literal["maximize", "minimize"] = "maximize" if higher_is_better else "minimize"
    return [best if name == ACCURACY else "minimize" for name in names]


def measure(model: nn.Module, names: Sequence[str], context: Context) -> dict[str, float]:
    """The size objectives among ``names`` measured on ``model`` (accuracy is left out)."""
    return {name: OBJECTIVES[name].measure(model, context) for name in names if name != ACCURACY}


@register_objective("nonzero_params", sees_zeros=True)
def nonzero_params(model: nn.Module, context: Context) -> float:
    """Nonzero weights of the context's Linear/Conv layers (a removed layer has none)."""
    modules = dict(model.named_modules())
    return float(
        sum(
            int(torch.count_nonzero(modules[name].weight))
            for name in context.layers
            if isinstance(modules.get(name), PRUNABLE_TYPES)
        )
    )


@register_objective("bytes", sees_zeros=True, sees_quantization=True)
def bytes_(model: nn.Module, context: Context) -> float:
    """Bytes of the deployed file: a deployed model's ``model.onnx``, else the exported state
    (sparse weights stored as a bitmask and their nonzeros)."""
    if isinstance(model, OnnxModel):
        return float(model.file_bytes)
    return float(exported_bytes(model))


@register_objective("macs", sees_zeros=False)
def macs(model: nn.Module, context: Context) -> float:
    """Multiply-accumulates of one forward pass of one input (``torch.utils.flop_counter``)."""
    example = devices.to_device(context.example, _device(model))
    with _eval_mode([model]), torch.no_grad(), FlopCounterMode(display=False) as counter:
        context.forward(model, example)
    return counter.get_total_flops() / 2


@register_objective("latency_ms", sees_zeros=False, sees_quantization=True)
def latency_ms(model: nn.Module, context: Context) -> float:
    """Median milliseconds of a forward pass of a batch on the model's device, or in ONNX
    Runtime for a deployed model (see :class:`Latency`)."""
    return compare_latency([model], context.example, context.latency, context.forward)[0]


def compare_latency(
    models: Sequence[nn.Module],
    example: Any,
    settings: Latency,
    forward: Callable[[nn.Module, Any], Any] = _call,
) -> list[float]:
    """Median milliseconds per forward pass of each model on its device, measured interleaved
    (model A, B, A, B, ...) so that a load change on the machine affects them alike.

    The batch is ``example``'s first sample repeated ``settings.batch_size`` times; a GPU is
    synchronized around each pass, so the time is the pass's, not its launch's.
    """
    batch = devices.map_tensors(
        lambda t: t[:1].expand(settings.batch_size, *t.shape[1:]).contiguous() if t.dim() else t,
        example,
    )
    on = [devices.to_device(batch, _device(model)) for model in models]
    times: list[list[float]] = [[] for _ in models]
    with _eval_mode(models), _threads(settings.threads), torch.inference_mode():
        for model, inputs in zip(models, on, strict=True):
            for _ in range(settings.warmup):
                forward(model, inputs)
        for _ in range(settings.repeats):
            for i, (model, inputs) in enumerate(zip(models, on, strict=True)):
                device = _device(model)
                _synchronize(device)
                start = time.perf_counter()
                forward(model, inputs)
                _synchronize(device)
                times[i].append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def _device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a frozen or parameterless one)."""
    params = getattr(model, "parameters", None)
    if params is not None:
        for param in params():
            return param.device
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Models in eval mode (BatchNorm uses its running statistics), their modes restored.
    Frozen TorchScript models have no mode: they are left as they are."""
    eager = [model for model in models if isinstance(getattr(model, "training", None), bool)]
    modes = [model.training for model in eager]
    try:
        for model in eager:
            model.eval()
        yield
    finally:
        for model, mode in zip(eager, modes, strict=True):
            model.train(mode)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
