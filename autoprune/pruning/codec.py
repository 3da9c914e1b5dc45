"""autoprune's one weight format: a state dict where a tensor with enough exact zeros is stored
as a packed bitmask of its nonzeros plus their values (``numel / 8 + nnz * itemsize`` bytes
instead of ``numel * itemsize``), so bytes on disk shrink with sparsity.

Front-trial weights (Optuna artifacts), an export's ``model.pt`` and the ``bytes`` objective
all use it, so the objective counts exactly the bytes an export writes. The file is a
``torch.save`` of plain data only (strings, ints, tensors), read back with
``weights_only=True``: loading never unpickles code.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from autoprune._files import atomic_write
from autoprune.errors import StorageError

FORMAT = "autoprune-weights/2"
# Front weights written before this format (``study/artifacts.py``, autoprune 0.1): still read.
_OLD_FORMAT = 1


def _pack(tensor: Tensor) -> dict[str, Any] | None:
    """A float tensor as ``{"mask": packed bits of its nonzeros, "values", "shape"}`` (shape:
    a list of ints) when that is smaller than the tensor itself; None when it is not."""
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.dim() < 1:
        return None
    nonzero = tensor != 0
    nnz, n = int(nonzero.sum()), tensor.numel()
    if (n + 7) // 8 + nnz * tensor.element_size() >= n * tensor.element_size():
        return None
    return {
        "mask": torch.from_numpy(np.packbits(nonzero.flatten().numpy(), bitorder="little")),
        "values": tensor[nonzero].clone(),
        "shape": list(tensor.shape),
    }


def _unpack(mask: Tensor, values: Tensor, shape: Tensor | list[int]) -> Tensor:
    """The inverse of :func:`_pack`."""
    size = torch.Size(shape.tolist() if isinstance(shape, Tensor) else shape)
    bits = np.unpackbits(mask.numpy(), count=size.numel(), bitorder="little").astype(bool)
    dense = torch.zeros(size.numel(), dtype=values.dtype)
    dense[torch.from_numpy(bits)] = values
    return dense.reshape(size)


def _encode(state: Mapping[str, Tensor]) -> bytes:
    tensors: dict[str, Any] = {}
    for key, tensor in state.items():
        part = _pack(tensor)
        # clone: a view would otherwise drag its whole storage into the file
        tensors[key] = tensor.detach().cpu().clone() if part is None else part
    buffer = io.BytesIO()
    # Always through a buffer: torch.save names the archive after a file, so a file's size
    # would depend on its name, and exported_bytes would not count it exactly.
    torch.save({"format": FORMAT, "tensors": tensors}, buffer)
    return buffer.getvalue()


def save_state(state: Mapping[str, Tensor], file: str | Path | BinaryIO) -> None:
    """Write a state dict in autoprune's weight format (see the module doc) to a path
    (replaced atomically) or a binary file object.

    Raises:
        OutputError: If the path cannot be written.
    """
    data = _encode(state)
    if not isinstance(file, (str, Path)):
        file.write(data)
        return
    atomic_write(file, data)


def load_state(file: str | Path | BinaryIO) -> dict[str, Tensor]:
    """Read a state dict written by :func:`save_state` (or by autoprune 0.1's front weights),
    never unpickling code (``weights_only=True``).

    Raises:
        StorageError: If the file cannot be read or is not an autoprune weights file.
    """
    name = repr(str(file)) if isinstance(file, (str, Path)) else "(stream)"
    try:
        if not isinstance(file, (str, Path)):
            file = io.BytesIO(file.read())  # torch.load wants a seekable file
        data = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StorageError(f"cannot read weights {name}: {first}") from e
    tag = data.get("format") if isinstance(data, dict) else None
    if tag not in (FORMAT, _OLD_FORMAT):
        raise StorageError(f"{name} is not an autoprune weights file (format {FORMAT!r})")
    try:
        # The old layout: {"dense": {key: tensor}, "sparse": {key: packed parts}}.
        old = tag == _OLD_FORMAT
        parts = {**data["dense"], **data["sparse"]} if old else data["tensors"]
        return {
            key: part if isinstance(part, Tensor) else _unpack(**part)
            for key, part in parts.items()
        }
    except (KeyError, AttributeError, TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StorageError(f"{name} is a damaged autoprune weights file: {first}") from e


def exported_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state in autoprune's weight format: the size of an export's
    ``model.pt``."""
    return len(_encode(model.state_dict()))
