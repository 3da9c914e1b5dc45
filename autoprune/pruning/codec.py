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
_MAX_DIMS = 64  # torch's own limit on a tensor's dimensions


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


def _unpack(key: str, part: Any) -> Tensor:
    """The inverse of :func:`_pack`, after checking that the parts agree with each other:
    nothing is allocated beyond what the file itself holds.

    Raises:
        ValueError: Naming ``key`` and the first part that is malformed.
    """
    if not isinstance(part, dict) or set(part) != {"mask", "shape", "values"}:
        parts = _name(list(part)) if isinstance(part, dict) else type(part).__name__
        raise ValueError(
            f"tensor {_name(key)} is not a dense tensor or mask/values/shape: {parts}"
        )
    mask, values = part["mask"], part["values"]
    size = _shape(key, part["shape"])
    n = size.numel()
    if not _plain(mask, contiguous=True) or mask.dtype != torch.uint8 or mask.dim() != 1:
        raise ValueError(f"tensor {_name(key)}: mask is not a contiguous 1-d uint8 tensor")
    if mask.numel() != (n + 7) // 8:  # checked before anything of size n is allocated
        raise ValueError(
            f"tensor {_name(key)}: shape {list(size)} needs a mask of {(n + 7) // 8} bytes, "
            f"the file holds {mask.numel()}"
        )
    if not _plain(values, contiguous=True) or not values.is_floating_point() or values.dim() != 1:
        raise ValueError(f"tensor {_name(key)}: values are not a contiguous 1-d float tensor")
    bits = np.unpackbits(mask.numpy(), bitorder="little").astype(bool)
    if bits[n:].any():
        raise ValueError(f"tensor {_name(key)}: mask has bits set past its {n} elements")
    bits = bits[:n]
    nnz = int(bits.sum())
    if values.numel() != nnz:
        raise ValueError(
            f"tensor {_name(key)}: mask has {nnz} nonzeros, the file holds {values.numel()} values"
        )
    dense = torch.zeros(n, dtype=values.dtype)
    dense[torch.from_numpy(bits)] = values
    return dense.reshape(size)


def _shape(key: str, shape: Any) -> torch.Size:
    # A list of ints (this format), or an int64 tensor (autoprune 0.1's front weights).
    if isinstance(shape, Tensor) and _plain(shape, contiguous=True) and shape.dim() == 1:
        if shape.is_floating_point() or shape.is_complex() or shape.dtype == torch.bool:
            raise ValueError(f"tensor {_name(key)}: shape is a {shape.dtype} tensor, not integers")
        shape = shape.tolist()
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise ValueError(
            f"tensor {_name(key)}: shape is not a list of integers >= 0: {_name(shape)}"
        )
    return torch.Size(shape)


def _plain(tensor: Any, *, contiguous: bool = False) -> bool:
    """A dense tensor in memory: not sparse, quantized or on the meta device; ``contiguous``:
    one element per stored element too, not an expanded view of a few bytes."""
    return (
        isinstance(tensor, Tensor)
        and tensor.layout == torch.strided
        and tensor.device.type == "cpu"
        and not tensor.is_quantized
        and (not contiguous or tensor.is_contiguous())
    )


def _name(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


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

    Every part is checked before it is used (tensor names are strings, a packed tensor's mask
    has one bit per element of its shape and its values one per set bit, values are floats),
    so a hostile file cannot make it allocate more than the file holds.

    Raises:
        StorageError: If the file cannot be read, is not a regular file, is not an autoprune
            weights file, or is malformed; one line naming the first bad tensor.
    """
    name = repr(str(file)) if isinstance(file, (str, Path)) else "(stream)"
    try:
        if isinstance(file, (str, Path)) and not Path(file).is_file():
            # A device, a FIFO or a directory (e.g. a symlink to /dev/zero) is no weights file.
            raise OSError("not a regular file" if Path(file).exists() else "no such file")
        if not isinstance(file, (str, Path)):
            file = io.BytesIO(file.read())  # torch.load wants a seekable file
        data = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StorageError(f"cannot read weights {name}: {first}") from e
    tag = data.get("format") if isinstance(data, dict) else None
    if tag not in (FORMAT, _OLD_FORMAT) or type(tag) not in (str, int):
        raise StorageError(f"{name} is not an autoprune weights file (format {FORMAT!r})")
    try:
        return _decode(data, old=tag == _OLD_FORMAT)
    except ValueError as e:
        raise StorageError(f"{name} is a damaged autoprune weights file: {e}") from e


def _decode(data: dict[str, Any], *, old: bool) -> dict[str, Tensor]:
    # The old layout: {"dense": {key: tensor}, "sparse": {key: packed parts}}.
    state: dict[str, Tensor] = {}
    for what in ("dense", "sparse") if old else ("tensors",):
        group = data.get(what)
        if not isinstance(group, dict):
            raise ValueError(f"{what!r} is {type(group).__name__}, not a dict of tensors")
        for key, part in group.items():
            if not isinstance(key, str):
                raise ValueError(f"tensor name {_name(key)} is not a string")
            if key in state:
                raise ValueError(f"tensor {_name(key)} is stored twice")
            if isinstance(part, Tensor):
                if not _plain(part):
                    raise ValueError(f"tensor {_name(key)} is not a dense tensor")
                state[key] = part
            else:
                state[key] = _unpack(key, part)
    return state


def exported_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state in autoprune's weight format: the size of an export's
    ``model.pt``."""
    return len(_encode(model.state_dict()))
