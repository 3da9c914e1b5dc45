"""What a structured plan leaves of a model: its parameters and multiply-accumulates, predicted
from the channel counts alone (the dependency graph's; a transformer's heads and neurons),
without pruning anything.

A pruned model is checked against these (the structured contract tests, ``scripts/zoo_check.py``):
a plan that removes what it should leaves a model of exactly the predicted size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from autoprune.devices import batch_size
from autoprune.pruning import transformer
from autoprune.pruning.masks import PRUNABLE_TYPES
from autoprune.pruning.structured import (
    Forward,
    Plan,
    apply_plan,
    dependency_graph,
    pruning_groups,
    run,
    split_units,
)


def predict_params(
    model: nn.Module, plan: Plan, example: Any, *, forward: Forward | None = None
) -> int:
    """Parameters ``model`` will have once ``plan`` is applied (``example``: a batch that
    ``forward`` takes, as for :func:`autoprune.pruning.structured.apply_plan`)."""
    _, sizes = _kept(model, plan, example, forward)
    return sum(params for params, _ in sizes.values())


def predict_macs(
    model: nn.Module, plan: Plan, example: Any, *, forward: Forward | None = None
) -> int:
    """Multiply-accumulates of the Linear/Conv layers in a forward pass of one sample of
    ``example``, once ``plan`` is applied: the ``macs`` objective of the pruned model, for
    models whose multiplications all happen in such layers (convolutional networks)."""
    blocks_gone, sizes = _kept(model, plan, example, forward)
    positions = _positions(blocks_gone, example, forward)
    return sum(positions.get(name, 0) * weights for name, (_, weights) in sizes.items())


def _kept(
    model: nn.Module, plan: Plan, example: Any, forward: Forward | None
) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """A copy of ``model`` without ``plan``'s blocks, and for each of its modules the
    parameters it keeps of its own and, for a Linear/Conv layer, the weights it keeps."""
    model = copy.deepcopy(model)
    apply_plan(model, Plan({}, plan.removed_blocks), example, forward=forward)
    plan, units = split_units(model, plan)
    lost_out: dict[int, int] = {}  # by id(): torch-pruning's targets include bare Parameters
    lost_in: dict[int, int] = {}

    def lose(lost: dict[int, int], target: Any, count: int) -> None:
        lost[id(target)] = lost.get(id(target), 0) + count

    for unit, idxs in units:  # heads and neurons: rows of their outputs, columns of inputs
        rows = unit.count * unit.width - len(transformer.kept_rows(unit, idxs))
        for name in unit.outputs:
            lose(lost_out, model.get_submodule(name), rows)
        for name in unit.inputs:
            lose(lost_in, model.get_submodule(name), rows)
    unwrapped: dict[int, int] = {}
    if plan.channels:
        graph = dependency_graph(model, example, forward)
        for _, _, group in pruning_groups(model, graph, plan):
            for dep, idxs in group:
                out = graph.is_out_channel_pruning_fn(dep.handler)
                lose(lost_out if out else lost_in, dep.target.module, len(idxs))
        unwrapped = {id(p): dim for p, dim in graph.unwrapped_parameters}
    sizes = {}
    for name, module in model.named_modules():
        out_lost, in_lost = lost_out.get(id(module), 0), lost_in.get(id(module), 0)
        params, weights = 0, 0
        for key, param in module.named_parameters(recurse=False):
            if id(param) in unwrapped:  # e.g. a layer scale: loses what its target loses
                params += _shrunk(param, unwrapped[id(param)], lost_out.get(id(param), 0))
            elif isinstance(module, PRUNABLE_TYPES) and key == "weight":
                out, fan_in, *kernel = param.shape
                groups = getattr(module, "groups", 1)
                weights = (out - out_lost) * (fan_in - in_lost // groups) * math.prod(kernel)
                params += weights
            elif isinstance(module, PRUNABLE_TYPES) or param.dim() and param.shape[0] > 1:
                params += _shrunk(param, 0, out_lost)  # a bias, a norm's per-channel affine
            else:
                params += param.numel()
        sizes[name] = (params, weights)
    return model, sizes


def _shrunk(param: Tensor, dim: int, lost: int) -> int:
    return param.numel() // param.shape[dim] * (param.shape[dim] - lost)


def _positions(model: nn.Module, example: Any, forward: Forward | None) -> Mapping[str, int]:
    """For each Linear/Conv layer, the output positions per sample (pixels, tokens) its weights
    are applied at in a forward pass of ``example``, summed over calls."""
    positions: dict[str, int] = {}
    samples = batch_size(example)

    def hook(name: str, module: nn.Module, out: Tensor) -> None:
        channels = out.shape[-1] if isinstance(module, nn.Linear) else out.shape[1]
        count = out.numel() // (channels * samples)
        positions[name] = positions.get(name, 0) + count

    hooks = [
        m.register_forward_hook(lambda m, _args, out, name=name: hook(name, m, out))
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE_TYPES)
    ]
    try:
        with torch.no_grad():
            run(model.eval(), example, forward)
    finally:
        for h in hooks:
            h.remove()
    return positions
