"""The sparse tensor codec: a tensor with enough exact zeros is stored as a packed bitmask of
its nonzeros plus their values (``numel / 8 + nnz * itemsize`` bytes instead of
``numel * itemsize``), so bytes on disk shrink with sparsity. Plain tensors only: every file
written with it is read back with ``weights_only=True``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor, nn

_MASK, _VALUES, _SHAPE = "::mask", "::values", "::shape"


def pack_tensor(tensor: Tensor) -> dict[str, Tensor] | None:
    """A float tensor as ``{"mask": packed bits of its nonzeros, "values", "shape"}`` when that
    is smaller than the tensor itself; None when it is not (store it dense)."""
    tensor = tensor.detach().cpu()
    nonzero = tensor != 0
    nnz, n = int(nonzero.sum()), tensor.numel()
    if not tensor.is_floating_point() or tensor.dim() < 1:
        return None
    if (n + 7) // 8 + nnz * tensor.element_size() >= n * tensor.element_size():
        return None
    return {
        "mask": torch.from_numpy(np.packbits(nonzero.flatten().numpy(), bitorder="little")),
        "values": tensor[nonzero].clone(),
        "shape": torch.tensor(tensor.shape, dtype=torch.int64),
    }


def unpack_tensor(mask: Tensor, values: Tensor, shape: Tensor) -> Tensor:
    """The inverse of :func:`pack_tensor`."""
    size = torch.Size(shape.tolist())
    bits = np.unpackbits(mask.numpy(), count=size.numel(), bitorder="little").astype(bool)
    dense = torch.zeros(size.numel(), dtype=values.dtype)
    dense[torch.from_numpy(bits)] = values
    return dense.reshape(size)


def pack_state(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict, each float tensor stored sparse when that is smaller."""
    packed: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        part = pack_tensor(tensor)
        if part is None:
            packed[key] = tensor.detach().cpu().clone()
        else:
            packed |= {key + _MASK: part["mask"], key + _VALUES: part["values"]}
            packed[key + _SHAPE] = part["shape"]
    return packed


def unpack_state(packed: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`pack_state`."""
    state: dict[str, Tensor] = {}
    for key, tensor in packed.items():
        if key.endswith(_MASK):
            name = key[: -len(_MASK)]
            state[name] = unpack_tensor(tensor, packed[name + _VALUES], packed[name + _SHAPE])
        elif not key.endswith((_VALUES, _SHAPE)):
            state[key] = tensor
    return state


def exported_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s packed state as :func:`torch.save` writes it."""
    buffer = io.BytesIO()
    torch.save(pack_state(model), buffer)
    return buffer.tell()
