"""Devices, precisions and batches: where a trial's tensors live and how they get there.

A batch is whatever the task's data yields: a tensor, a tuple or list, a dict, or any nesting
of them (a Hugging Face batch is a dict of tensors). :func:`to_device` moves every tensor in it;
other leaves (strings, numbers) are left as they are.

Nothing falls back silently: asking for ``"cuda"`` on a machine without a GPU is an error,
not a CPU run that takes a night instead of an hour.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from autoprune.errors import TaskError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(name: object) -> str:
    """Validate a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``), unresolved.

    Raises:
        TaskError: Naming the bad value.
    """
    if isinstance(name, str):
        kind, _, index = name.partition(":")
        if name in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
            return name
    raise TaskError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")


def check_precision(name: object) -> str:
    """Validate a precision name (``fp32``, ``bf16`` or ``fp16``).

    Raises:
        TaskError: Naming the bad value.
    """
    if name not in PRECISIONS:
        raise TaskError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return str(name)


def resolve_device(name: str) -> torch.device:
    """The device ``name`` stands for on this machine: ``auto`` takes the first GPU (CUDA, then
    MPS) when there is one, else the CPU.

    Raises:
        TaskError: If the named device is not available here (never a silent CPU fallback).
    """
    check_device(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TaskError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise TaskError(
                f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise TaskError(f"device {name!r} asked for, but MPS is not available here")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def map_tensors(fn: Callable[[Tensor], Any], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it, its structure kept (tuples, named
    tuples, lists, dicts and mappings such as Hugging Face's ``BatchEncoding``)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(map_tensors(fn, item) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, item) for item in batch)
    if isinstance(batch, Mapping):
        items = {key: map_tensors(fn, value) for key, value in batch.items()}
        return items if isinstance(batch, dict) else _remap(batch, items)
    return batch


def _remap(batch: Mapping[str, Any], items: dict[str, Any]) -> Any:
    try:
        return type(batch)(items)  # type: ignore[call-arg]
    except Exception:  # a mapping type that cannot be rebuilt from a dict: a plain dict will do
        return items


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device``; copies from pinned memory do not block."""
    non_blocking = device.type == "cuda"

    def move(tensor: Tensor) -> Tensor:
        if tensor.device == device:
            return tensor
        return tensor.to(device, non_blocking=non_blocking and tensor.is_pinned())

    return map_tensors(move, batch)


def first_tensor(batch: Any) -> Tensor | None:
    """The first tensor in ``batch`` (depth first), or None."""
    if isinstance(batch, Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (tuple, list)) or isinstance(batch, Mapping):
        for item in values:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: the first dimension of its first tensor (1 for a scalar).

    Raises:
        TaskError: If the batch holds no tensor.
    """
    tensor = first_tensor(batch)
    if tensor is None:
        raise TaskError(f"a batch must hold at least one tensor, got {type(batch).__name__}")
    return int(tensor.shape[0]) if tensor.dim() else 1


def slice_batch(batch: Any, stop: int) -> Any:
    """The first ``stop`` samples of ``batch`` (every tensor with a batch dimension is cut)."""
    return map_tensors(lambda t: t[:stop] if t.dim() else t, batch)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler: active for fp16 (whose small gradients underflow), a pass-through for
    fp32 and bf16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (CUDA or MPS)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_memory(device: torch.device) -> None:
    """Return the memory cached by the allocator of ``device`` (after a trial ran out of it)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and _mps_available():
        torch.mps.empty_cache()


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Measure the peak bytes allocated on a CUDA ``device`` inside the block (into
    ``["peak_bytes"]``; absent on other devices, whose allocators do not count)."""
    result: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        if device.type == "cuda":
            result["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
