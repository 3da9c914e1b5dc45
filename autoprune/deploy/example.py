"""An example batch as plain data: its structure, shapes and dtypes, without its values.

A structured export stores it so that :func:`autoprune.deploy.directory.load` can trace the
dense architecture (to replay the plan) on a batch of zeros of the same form. The description
comes from a file people share, so reading it is bounded: a few levels, a few tensors, a
limited number of elements, known dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
MAX_DEPTH = 4
MAX_TENSORS = 32
MAX_DIMS = 8
MAX_ELEMENTS = 2**24


def describe(batch: Any) -> Any:
    """``batch`` as JSON-able data: ``{"shape", "dtype"}`` per tensor, ``{"items": [...]}``
    per tuple or list, ``{"keys": {...}}`` per mapping (other leaves are dropped as None).

    Raises:
        ValueError: If a tensor's dtype cannot be described.
    """
    if isinstance(batch, Tensor):
        dtype = str(batch.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"cannot describe a tensor of dtype {dtype}")
        return {"shape": list(batch.shape), "dtype": dtype}
    if isinstance(batch, Mapping):
        return {"keys": {str(k): describe(v) for k, v in batch.items()}}
    if isinstance(batch, (tuple, list)):
        return {"items": [describe(item) for item in batch]}
    return None


def build(description: Any) -> Any:
    """A batch of zeros of the form :func:`describe` gave (tuples for ``items``, dicts for
    ``keys``), after checking the bounds.

    Raises:
        ValueError: One line naming what is malformed.
    """
    check(description)
    return _build(description)


def check(description: Any) -> None:
    """Check a description read from a file.

    Raises:
        ValueError: One line naming what is malformed.
    """
    counts = {"tensors": 0, "elements": 0}
    _check(description, 0, counts)


def _check(node: Any, depth: int, counts: dict[str, int]) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"'example' is nested deeper than {MAX_DEPTH} levels")
    if node is None:
        return
    if not isinstance(node, dict):
        raise ValueError(f"'example' holds {type(node).__name__}, not an object")
    if set(node) == {"shape", "dtype"}:
        shape, dtype = node["shape"], node["dtype"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise ValueError(
                f"'example' shapes must be lists of at most {MAX_DIMS} integers >= 0, "
                f"got {shape!r:.60}"
            )
        if dtype not in _DTYPES:
            raise ValueError(
                f"'example' dtype must be one of {', '.join(_DTYPES)}, got {dtype!r:.40}"
            )
        counts["tensors"] += 1
        counts["elements"] += math.prod(shape)
        if counts["tensors"] > MAX_TENSORS or counts["elements"] > MAX_ELEMENTS:
            raise ValueError(
                f"'example' holds more than {MAX_TENSORS} tensors or {MAX_ELEMENTS} elements"
            )
    elif set(node) == {"items"} and isinstance(node["items"], list):
        for item in node["items"]:
            _check(item, depth + 1, counts)
    elif set(node) == {"keys"} and isinstance(node["keys"], dict):
        for item in node["keys"].values():
            _check(item, depth + 1, counts)
    else:
        raise ValueError(f"'example' holds an object with keys {sorted(node)!r:.60}")


def _build(node: Any) -> Any:
    if node is None:
        return None
    if "shape" in node:
        return torch.zeros(node["shape"], dtype=_DTYPES[node["dtype"]])
    if "items" in node:
        return tuple(_build(item) for item in node["items"])
    return {key: _build(item) for key, item in node["keys"].items()}
