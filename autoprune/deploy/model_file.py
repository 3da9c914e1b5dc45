"""One file for a pruned (also structured) model, and loading it back, without unpickling.

The file holds plain data only (strings, ints, tensors), read with ``weights_only=True``:

- the policy (JSON) and, for structured pruning, the :class:`~autoprune.pruning.structured.Plan`
  (JSON: which channels of which layers and which blocks were removed);
- the shape of one input, to trace the dependency graph when the plan is replayed;
- the state dict, where a weight with enough exact zeros is stored as a packed bitmask and
  its nonzero values (so unstructured sparsity makes the file smaller too).

Loading replays the plan on a fresh copy of the base architecture (deterministic: the stored
channel indices, no scores), which gives the smaller model's shapes, then loads the weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from autoprune.errors import TaskError
from autoprune.pruning.codec import pack_state, unpack_state
from autoprune.pruning.structured import Plan, apply_plan, example_input
from autoprune.study.study import replay

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from autoprune.pruning.policy import Policy
    from autoprune.task import Task

FORMAT = "autoprune-export/1"


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
    """Replay a finished trial (see :func:`autoprune.study.study.materialize`) and export
    its model.

    Raises:
        TaskError: If ``trial`` holds no autoprune policy or does not fit the task's model.
    """
    result = replay(task, trial)
    example = example_input(task.val)
    return export_model(
        result.model, path, policy=result.policy, example=example, plan=result.plan
    )
