"""Structured pruning: remove whole output channels, neurons and residual blocks for real.

Layers whose output channels are coupled (a convolution and its BatchNorm, every layer that
writes into one residual stream, a convolution flattened into a linear layer, a depthwise
convolution and the layer that feeds it, a squeeze-excitation gate and the channels it scales)
must lose the same channels. Torch-Pruning's dependency graph finds these *channel groups*; a
group is named after its first layer (module path, definition order) and is pruned as one: one
channel ratio per group, one score per channel summed over the group's layers.

A structured policy becomes a :class:`Plan` (which channels of which group, which blocks go):
plain data that can be stored, and replayed on the base architecture to rebuild the pruned
model's shapes without unpickling anything (see :mod:`autoprune.deploy.directory`).

A transformer's groups are its attention heads and FFN neurons instead, found and removed by
:mod:`autoprune.pruning.transformer` through the same groups, scores and plans.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from autoprune.devices import to_device
from autoprune.errors import TaskError
from autoprune.pruning import transformer
from autoprune.pruning.calibration import LayerStats, calibrate
from autoprune.pruning.criteria import get_criterion
from autoprune.pruning.masks import PRUNABLE_TYPES, compute_masks, layer_stats
from autoprune.pruning.policy import Policy
from autoprune.task import Task

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output channels are removed together.

    Args:
        name: The group's first layer, or a transformer's attention module (its key in a
            structured policy).
        layers: Linear/Conv layers that lose output channels, in definition order.
        batchnorms: BatchNorms that lose the same channels.
        channels: Channels in the group: the units a ratio counts and a plan removes.
        inputs: Layers that lose the matching input columns, scored on them (a transformer's
            output projection); Torch-Pruning's groups score their output layers only.
        unit: Rows per channel: an attention head's ``head_dim``, else 1.
        kind: ``"channels"`` (Torch-Pruning's graph), ``"heads"`` or ``"neurons"`` (a
            transformer's, see :mod:`autoprune.pruning.transformer`).
        parts: The channels are this many equal runs (the groups of a grouped convolution or
            GroupNorm they feed or come from), and every run loses the same offsets, so the
            convolution keeps its groups.
    """

    name: str
    layers: tuple[str, ...]
    batchnorms: tuple[str, ...]
    channels: int
    inputs: tuple[str, ...] = ()
    unit: int = 1
    kind: str = "channels"
    parts: int = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """What structured pruning removes: channel indices per group, and whole blocks.

    ``channels`` maps a surviving layer of each group to the sorted indices of the output
    channels removed from it (indices into the dense model's channels).
    """

    channels: Mapping[str, tuple[int, ...]]
    removed_blocks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": {k: list(v) for k, v in self.channels.items()},
            "removed_blocks": list(self.removed_blocks),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        channels = {str(k): tuple(int(i) for i in v) for k, v in data["channels"].items()}
        return cls(channels, tuple(str(b) for b in data.get("removed_blocks", ())))


# ``forward(model, batch)``: how a task's batch meets its model (``Task.forward``); without one,
# ``model(example)``.
Forward = Callable[[nn.Module, Any], Any]


def run(model: nn.Module, example: Any, forward: Forward | None = None) -> Any:
    """``model``'s outputs on ``example``, through ``forward`` when given."""
    return forward(model, example) if forward is not None else model(example)


def prune_task_model(
    model: nn.Module,
    task: Task,
    policy: Policy,
    *,
    seed: int,
    stats: Mapping[str, LayerStats] | None = None,
) -> Plan:
    """Prune ``model`` (a copy of ``task.model``) in place by the structured ``policy``.

    The random criterion draws from ``seed``; criteria that need calibration statistics use
    ``stats``, or statistics measured here on the task's training data.
    """
    example = to_device(task.example(2), next(model.parameters()).device)
    groups = channel_groups(model, example, forward=task.forward)
    needs = get_criterion(policy.criterion).needs
    if needs and stats is None:
        layers = sorted({layer for g in groups for layer in (*g.layers, *g.inputs)})
        stats = calibrate(model, task, layers, needs)
    torch.manual_seed(seed)
    return prune_structured(model, policy, example, stats, groups, forward=task.forward)


def dependency_graph(
    model: nn.Module, example: Any, forward: Forward | None = None
) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced on ``example`` in eval mode (a
    batch of the task, through its ``forward``; else ``model(example)``)."""
    was_training = model.training
    model.eval()
    forward_fn = (lambda m, x: run(m, x, forward)) if forward is not None else None
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example, forward_fn=forward_fn, verbose=False
            )
    finally:
        model.train(was_training)


def channel_groups(
    model: nn.Module,
    example: Any,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    *,
    forward: Forward | None = None,
) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, in the order of their first layers.

    A group is left out when its name does not match an ``include`` glob or matches an
    ``exclude`` glob, when its channels are the model's outputs (the classes), or when they do
    not split into its parts. A transformer's groups are its heads and FFN neurons (nothing is
    traced).
    """
    units = transformer.find_units(model)
    if units:
        found = [
            ChannelGroup(u.name, u.outputs, (), u.count, u.inputs, u.width, u.kind) for u in units
        ]
        return [g for g in found if _selected(g.name, include, exclude)]
    graph = dependency_graph(model, example, forward)
    names = {module: name for name, module in model.named_modules()}
    order = {name: i for i, name in enumerate(names.values())}
    groups = []
    for group in graph.get_all_groups(root_module_types=PRUNABLE_TYPES):
        layers, norms, is_output = [], [], False
        for dep, _ in group:
            module, handler = dep.target.module, dep.handler
            if not graph.is_out_channel_pruning_fn(handler) or module not in names:
                continue
            if isinstance(module, PRUNABLE_TYPES):
                layers.append(names[module])
                is_output |= not graph.module2node[module].outputs
            elif isinstance(module, _NORM_TYPES):
                norms.append(names[module])
        if is_output or not layers:
            continue
        layers.sort(key=order.__getitem__)
        channels = _out_channels(dict(model.named_modules())[layers[0]])
        parts = _parts(graph, group)
        if channels % parts:  # runs that do not tile the channels (a concatenation)
            continue
        groups.append(
            ChannelGroup(layers[0], tuple(layers), tuple(sorted(norms)), channels, parts=parts)
        )
    groups.sort(key=lambda g: order[g.name])
    return [g for g in groups if _selected(g.name, include, exclude)]


def removable_blocks(
    model: nn.Module, example: Any, globs: Sequence[str], *, forward: Forward | None = None
) -> list[str]:
    """Module paths matching ``globs`` that can be replaced by the identity: containers of a
    Linear/Conv layer whose output has their input's shape (residual blocks without
    projection). A glob may match more (``*`` spans dots): single layers and what lies inside
    a matched block are left out.

    Raises:
        TaskError: If a matched module changes the shape of what flows through it.
    """
    if not globs:
        return []
    modules = dict(model.named_modules())
    chosen = [
        name
        for name, m in modules.items()
        if name
        and any(fnmatch.fnmatchcase(name, g) for g in globs)
        and any(True for _ in m.children())
        and any(isinstance(layer, PRUNABLE_TYPES) for layer in m.modules())
    ]
    # A glob like "stages.*" also matches the layers inside a block: the block is what goes.
    chosen = [n for n in chosen if not any(n.startswith(f"{other}.") for other in chosen)]
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, args, out, name=name: shapes.__setitem__(name, (args[0].shape, out.shape))
        )
        for name in chosen
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            run(model.eval(), example, forward)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    for name in chosen:
        if name not in shapes or shapes[name][0] != shapes[name][1]:
            raise TaskError(f"block {name!r} changes the shape of its input: it cannot be removed")
    return chosen


def plan(
    model: nn.Module,
    policy: Policy,
    groups: Sequence[ChannelGroup],
    stats: Mapping[str, LayerStats] | None = None,
) -> Plan:
    """Which channels of ``policy``'s groups go, by its criterion, scope and rule.

    Every group keeps at least one channel (``round_to`` when it has that many), and with
    ``round_to`` > 1 a multiple of it (heads: a number whose rows are a multiple of it).
    Layers inside removed blocks neither score nor vote. A group of several ``parts`` is ranked
    by offset within a part (scores averaged over the parts), and loses the same offsets in
    every part.

    Raises:
        TaskError: If the policy names a group the model does not have, or the criterion scores
            BatchNorm scales and a group has no BatchNorm.
    """
    by_name = {g.name: _surviving(g, policy.removed_blocks) for g in groups}
    missing = sorted(set(policy.sparsity) - set(by_name))
    if missing:
        raise TaskError(
            f"the policy prunes channel group {missing[0]!r}, which the model does not have "
            f"(groups: {', '.join(by_name)})"
        )
    chosen = {name: g for name in policy.sparsity if (g := by_name[name]) is not None}
    scores = {
        name: s.view(chosen[name].parts, -1).mean(0)  # one score per offset within a part
        for name, s in _group_scores(model, policy, chosen, stats).items()
    }
    if not scores:
        return Plan({}, policy.removed_blocks)
    masks = compute_masks(dataclasses.replace(policy, sparsity=_only(policy, scores)), scores)
    channels = {}
    for name, keep in masks.items():
        group = chosen[name]
        keep = _round_kept(keep, scores[name], _step(policy.round_to, group.unit * group.parts))
        keep = keep.repeat(group.parts)
        pruned = tuple(int(i) for i in torch.nonzero(~keep).flatten())
        if pruned:
            channels[group.layers[0] if group.kind == "channels" else name] = pruned
    return Plan(channels, policy.removed_blocks)


class Skip(nn.Identity):
    """What a removed block becomes: its first input, whatever else it is called with (a
    transformer's layer also gets an attention mask and more)."""

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        return input


def apply_plan(
    model: nn.Module, plan: Plan, example: Any, *, forward: Forward | None = None
) -> nn.Module:
    """Remove ``plan``'s blocks and channels from ``model`` in place; return it."""
    for name in plan.removed_blocks:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Skip())
    plan, units = split_units(model, plan)
    for unit, idxs in units:
        transformer.remove(model, unit, idxs)
    if units:
        transformer.update_config(model, transformer.find_units(model))
    if plan.channels:
        graph = dependency_graph(model, example, forward)
        for layer, idxs, group in pruning_groups(model, graph, plan):
            if not graph.check_pruning_group(group):
                raise TaskError(f"cannot remove channels {list(idxs)} of layer {layer!r}")
            group.prune()
    return model


def zero_channels(
    model: nn.Module, plan: Plan, example: Any, *, forward: Forward | None = None
) -> nn.Module:
    """The masked equivalent of ``plan`` (no blocks): zero, in place, the weights and biases of
    every removed output channel of each group's layers and BatchNorms; return ``model``.

    Equivalent unless a LayerNorm or GroupNorm sees the removed channels: their statistics
    count the zeroed channels, and the pruned model's do not."""
    if plan.removed_blocks:
        raise ValueError("zero_channels does not remove blocks")
    plan, units = split_units(model, plan)
    for unit, idxs in units:
        transformer.zero(model, unit, idxs)
    if not plan.channels:
        return model
    graph = dependency_graph(model, example, forward)
    with torch.no_grad():
        for _, _, group in pruning_groups(model, graph, plan):
            for dep, idxs in group:
                module = dep.target.module
                if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(
                    module, (*PRUNABLE_TYPES, *_NORM_TYPES)
                ):
                    for param in (module.weight, module.bias):
                        if param is not None:
                            param[list(idxs)] = 0.0
    return model


def prune_structured(
    model: nn.Module,
    policy: Policy,
    example: Any,
    stats: Mapping[str, LayerStats] | None = None,
    groups: Sequence[ChannelGroup] | None = None,
    *,
    forward: Forward | None = None,
) -> Plan:
    """Plan ``policy`` on ``model`` and apply it in place; return the plan."""
    if groups is None:
        groups = channel_groups(model, example, forward=forward)
    # raises on a non-identity block
    removable_blocks(model, example, policy.removed_blocks, forward=forward)
    result = plan(model, policy, groups, stats)
    apply_plan(model, result, example, forward=forward)
    return result


def split_units(
    model: nn.Module, plan: Plan
) -> tuple[Plan, list[tuple[transformer.Unit, tuple[int, ...]]]]:
    """``plan`` without its transformer groups, and those groups' units and indices."""
    units = {u.name: u for u in transformer.find_units(model)} if plan.channels else {}
    ours = [(units[key], idxs) for key, idxs in plan.channels.items() if key in units]
    rest = {key: idxs for key, idxs in plan.channels.items() if key not in units}
    return Plan(rest, plan.removed_blocks), ours


def pruning_groups(
    model: nn.Module, graph: tp.DependencyGraph, plan: Plan
) -> Iterator[tuple[str, tuple[int, ...], Any]]:
    """Each layer of ``plan``, its removed channels, and torch-pruning's group that removes
    them from every coupled layer; a TaskError if the model lacks the layer."""
    for layer, idxs in plan.channels.items():
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise TaskError(f"the plan prunes layer {layer!r}, which the model lacks") from None
        handler = graph.get_pruner_of_module(module).prune_out_channels
        yield layer, idxs, graph.get_pruning_group(module, handler, list(idxs))


def _group_scores(
    model: nn.Module,
    policy: Policy,
    groups: Mapping[str, ChannelGroup],
    stats: Mapping[str, LayerStats] | None,
) -> dict[str, Tensor]:
    criterion = get_criterion(policy.criterion, "structured")
    assert criterion.channel_score is not None
    modules = dict(model.named_modules())
    scores = {}
    with torch.no_grad():
        for name in sorted(groups):  # the random criterion draws alike for equal policies
            group = groups[name]
            sources = group.batchnorms if criterion.channel_source == "batchnorm" else group.layers
            if not sources:
                raise TaskError(
                    f"criterion {policy.criterion!r} scores BatchNorm scales, and channel "
                    f"group {name!r} has no BatchNorm"
                )
            total = torch.zeros(group.channels * group.unit)
            given = layer_stats(criterion, stats, (*sources, *group.inputs))
            for source in (*sources, *group.inputs):
                weight, source_stats = modules[source].weight.detach(), given[source]
                if source in group.inputs:  # its input columns: the rows of the transpose
                    weight, source_stats = weight.T, source_stats.transposed()
                total += criterion.channel_score(weight, source_stats).float()
            scores[name] = total.reshape(group.channels, group.unit).sum(dim=1)
    return scores


def kept_channels(
    channels: int, ratio: float, round_to: int = 1, unit: int = 1, parts: int = 1
) -> int:
    """How many of a group's ``channels`` (of ``unit`` rows each, in ``parts`` equal runs) the
    ``ratio`` rule keeps at ``ratio`` in the layer scope, once :func:`plan` has rounded the
    count to ``round_to``."""
    n = channels // parts
    return parts * _rounded(n - round(ratio * n), n, _step(round_to, unit * parts))


def group_sizes(model: nn.Module, names: Sequence[str]) -> list[tuple[int, int]]:
    """``(channels, rows per channel)`` of each named channel group of ``model``."""
    units = {u.name: u for u in transformer.find_units(model)}
    modules = dict(model.named_modules())
    return [
        (units[n].count, units[n].width) if n in units else (_out_channels(modules[n]), 1)
        for n in names
    ]


def _step(round_to: int, rows: int) -> int:
    """Channels to round to so that the kept rows (``rows`` per channel, counting every part)
    are a multiple of ``round_to``."""
    return round_to // math.gcd(round_to, rows)


def _parts(graph: tp.DependencyGraph, group: Any) -> int:
    """The least common multiple of the groups of the grouped convolutions (not depthwise ones)
    and GroupNorms in torch-pruning's ``group``. Torch-pruning removes a grouped convolution's
    input channels by their offsets in its first group alone."""
    parts = 1
    for dep, _ in group:
        module, pruner = dep.target.module, getattr(dep.handler, "__self__", None)
        if pruner is None or (
            isinstance(module, _CONV_TYPES) and module.groups == module.out_channels
        ):
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            count = pruner.get_out_channel_groups(module)
        else:
            count = pruner.get_in_channel_groups(module)
        parts = math.lcm(parts, int(count or 1))
    return parts


def _rounded(kept: int, n: int, round_to: int) -> int:
    """``kept`` rounded to a multiple of ``round_to``, at least one multiple (or all ``n``
    channels, if fewer) and at least one channel."""
    return max(1, min(n, max(round_to, round_to * round(kept / round_to))))


def _round_kept(keep: Tensor, scores: Tensor, round_to: int) -> Tensor:
    """Keep the best ``k`` channels, ``k`` the kept count rounded by :func:`_rounded`."""
    n, kept = keep.numel(), int(keep.sum())
    k = _rounded(kept, n, round_to)
    if k == kept:
        return keep
    order = torch.argsort(scores, descending=True, stable=True)
    new = torch.zeros(n, dtype=torch.bool)
    new[order[:k]] = True
    return new


def _surviving(group: ChannelGroup, blocks: Sequence[str]) -> ChannelGroup | None:
    def inside(name: str) -> bool:
        return any(name.startswith(f"{block}.") for block in blocks)

    layers = tuple(name for name in group.layers if not inside(name))
    if not layers:
        return None
    norms = tuple(name for name in group.batchnorms if not inside(name))
    return dataclasses.replace(group, layers=layers, batchnorms=norms)


def _only(policy: Policy, scores: Mapping[str, Tensor]) -> dict[str, float]:
    return {name: policy.sparsity[name] for name in scores}


def _out_channels(module: nn.Module) -> int:
    weight: Tensor = module.weight  # type: ignore[assignment]
    return int(weight.shape[0])


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in include) and not any(
        fnmatch.fnmatchcase(name, g) for g in exclude
    )
