"""One file for a pruned (also structured) model, and loading it back, without unpickling.

The file holds plain data only (strings, ints, tensors), read with ``weights_only=True``:

- the policy (JSON) and, for structured pruning, the :class:`~autoprune.structured.Plan`
  (JSON: which channels of which layers and which blocks were removed);
- the shape of one input, to trace the dependency graph when the plan is replayed;
- the state dict, where a weight with enough exact zeros is stored as a packed bitmask and
  its nonzero values (so unstructured sparsity makes the file smaller too).

Loading replays the plan on a fresh copy of the base architecture (deterministic: the stored
channel indices, no scores), which gives the smaller model's shapes, then loads the weights.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from autoprune.errors import TaskError

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from autoprune.policy import Policy
    from autoprune.structured import Plan
    from autoprune.task import Task

FORMAT = "autoprune-export/1"
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


def export_model(
    model: nn.Module,
    path: str | Path,
    *,
    policy: Policy,
    example: Tensor,
    plan: Plan | None = None,
) -> Path:
    """Write ``model`` (pruned by ``policy``, and by ``plan`` if structured) to ``path``."""
    path = Path(path)
    data: dict[str, Any] = {
        "format": FORMAT,
        "policy": policy.to_json(),
        "plan": json.dumps(plan.to_dict()) if plan is not None else "",
        "input_shape": [1, *example.shape[1:]],
        "state": pack_state(model),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path, base: nn.Module) -> nn.Module:
    """Rebuild an exported model on a copy of ``base`` (the dense architecture; its weights
    are replaced) and load its weights.

    Raises:
        TaskError: If the file is not an autoprune export or does not fit ``base``.
    """
    from autoprune.structured import Plan, apply_plan

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TaskError(f"cannot read exported model {str(path)!r}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TaskError(f"{str(path)!r} is not an autoprune export ({FORMAT})")
    model = copy.deepcopy(base)
    if data["plan"]:
        example = torch.zeros(data["input_shape"])
        apply_plan(model, Plan.from_dict(json.loads(data["plan"])), example)
    try:
        model.load_state_dict(unpack_state(data["state"]), strict=True)
    except RuntimeError as e:
        raise TaskError(f"exported model {str(path)!r} does not fit the base model: {e}") from e
    return model.eval()


def export_trial(task: Task, trial: FrozenTrial, path: str | Path) -> Path:
    """Replay a finished trial (see :func:`autoprune.search.materialize`) and export its model.

    Raises:
        TaskError: If ``trial`` holds no autoprune policy or does not fit the task's model.
    """
    from autoprune.search import replay
    from autoprune.structured import example_input

    result = replay(task, trial)
    example = example_input(task.val)
    return export_model(
        result.model, path, policy=result.policy, example=example, plan=result.plan
    )
