"""Pruning as pure functions: find the layers, score them, compute masks, apply and fold them.

Masks are applied with :mod:`torch.nn.utils.prune`: the mask is a buffer (``weight_mask``), the
trained tensor is kept as the same ``Parameter`` object (``weight_orig``, so optimizers stay
valid) and ``forward`` sees ``weight = weight_orig * weight_mask``. Pruned weights therefore get
a zero gradient and stay exactly zero through fine-tuning.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from autoprune.errors import TaskError
from autoprune.pruning import transformer
from autoprune.pruning.calibration import LayerStats
from autoprune.pruning.criteria import NO_STATS, Criterion, get_criterion
from autoprune.pruning.policy import Policy

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layers(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> list[str]:
    """Module paths of the Linear/Conv layers whose path matches an ``include`` glob and no
    ``exclude`` glob, in definition order.

    A Hugging Face model's task head (e.g. ``classifier``) and embeddings are left out unless
    an include glob other than ``*`` matches them (``include = ["*", "classifier"]``): see
    :func:`autoprune.pruning.transformer.protected_layers`.

    Raises:
        TaskError: If no layer is left (the model has none, or the globs match none).
    """
    names = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    if not names:
        raise TaskError(f"model {type(model).__name__} has no prunable Linear or Conv layer")
    protected = transformer.protected_layers(model, names)
    chosen = [
        name
        for name in names
        if any(fnmatch.fnmatchcase(name, g) for g in include)
        and not any(fnmatch.fnmatchcase(name, g) for g in exclude)
        and (name not in protected or transformer.named_explicitly(name, include))
    ]
    if not chosen:
        dense = f" (head and embeddings: {', '.join(sorted(protected))})" if protected else ""
        raise TaskError(
            f"include {list(include)} / exclude {list(exclude)} match no prunable layer "
            f"(layers: {', '.join(names)}){dense}"
        )
    return chosen


def weights(model: nn.Module, layers: Sequence[str]) -> dict[str, Tensor]:
    """The weight each forward pass sees for each named layer (masked, if masks are applied)."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight for name in layers}


def score(
    model: nn.Module, policy: Policy, stats: Mapping[str, LayerStats] | None = None
) -> dict[str, Tensor]:
    """Scores of the policy's criterion for each of the policy's layers (no gradient kept).

    ``stats``: the calibration statistics of each layer (see
    :func:`~autoprune.pruning.calibration.calibrate`), needed by criteria that read them.
    """
    criterion = get_criterion(policy.criterion, "unstructured")
    assert criterion.score is not None
    layers = sorted(policy.sparsity)
    # In sorted order: the random criterion's draws must not depend on the order the layers
    # are listed in, since policies that compare equal must prune alike.
    given = layer_stats(criterion, stats, layers)
    with torch.no_grad():
        score_fn = criterion.score
        return {
            name: score_fn(w.detach(), given[name]) for name, w in weights(model, layers).items()
        }


def layer_stats(
    criterion: Criterion, stats: Mapping[str, LayerStats] | None, layers: Sequence[str]
) -> dict[str, LayerStats]:
    """What ``criterion`` is given for each of ``layers``: the statistics it needs (no others,
    so that it cannot depend on what else was measured).

    Raises:
        ValueError: If the criterion needs statistics and ``stats`` lacks them.
    """
    if not criterion.needs:
        return dict.fromkeys(layers, NO_STATS)
    missing = [
        f"{stat} of {name}"
        for name in layers
        for stat in criterion.needs
        if stats is None or name not in stats or getattr(stats[name], stat) is None
    ]
    if missing:
        raise ValueError(
            f"criterion {criterion.name!r} needs calibration statistics: no {missing[0]}"
        )
    assert stats is not None
    return {
        name: LayerStats(**{stat: getattr(stats[name], stat) for stat in criterion.needs})
        for name in layers
    }


def compute_masks(policy: Policy, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Boolean keep-masks (True = kept), one per layer of the policy, shaped like its scores.

    The weights with the lowest scores are pruned. With the ``ratio`` rule a layer (``layer``
    scope) loses exactly ``round(sparsity * size)`` weights and the pool of all layers
    (``global`` scope) exactly ``round(sum(sparsity * size))``, ties broken by position; with
    the ``mean`` rule a layer loses those scoring below ``alpha * mean(scores)``, at most
    ``round(sparsity * size)``.
    """
    layers = sorted(policy.sparsity)  # global ties are broken alike for equal policies
    flat = {name: scores[name].detach().flatten().float() for name in layers}
    caps = {name: round(policy.sparsity[name] * flat[name].numel()) for name in layers}
    if policy.rule == "mean":
        if policy.scope == "global":
            pooled = torch.cat([flat[name] for name in layers])
            thresholds = dict.fromkeys(layers, policy.alpha * pooled.mean())
        else:
            thresholds = {name: policy.alpha * flat[name].mean() for name in layers}
        counts = {
            name: min(int((flat[name] < thresholds[name]).sum()), caps[name]) for name in layers
        }
        return {name: _keep_mask(flat[name], counts[name], scores[name].shape) for name in layers}
    if policy.scope == "layer":
        return {name: _keep_mask(flat[name], caps[name], scores[name].shape) for name in layers}
    # Global ratio: one ranking over the pool decides how the total is split between layers.
    # The total is rounded once, not per layer, so it is the nearest count to the target.
    pooled = torch.cat([flat[name] for name in layers])
    total = round(sum(policy.sparsity[name] * flat[name].numel() for name in layers))
    keep = _keep_mask(pooled, total, pooled.shape)
    masks, start = {}, 0
    for name in layers:
        size = flat[name].numel()
        masks[name] = keep[start : start + size].reshape(scores[name].shape)
        start += size
    return masks


def _keep_mask(flat_scores: Tensor, n_pruned: int, shape: torch.Size) -> Tensor:
    keep = torch.ones(flat_scores.numel(), dtype=torch.bool)
    if n_pruned > 0:
        order = torch.argsort(flat_scores, stable=True)
        keep[order[:n_pruned]] = False
    return keep.reshape(shape)


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Hold each layer's weight at ``orig * mask`` from now on (in place)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name]
        weight = module.weight
        prune.custom_from_mask(module, "weight", mask.to(weight.device, weight.dtype))
        # prune stores ``orig * mask`` as a non-leaf tensor, which copy.deepcopy refuses
        # (pytorch#37322); the hook recomputes it at every forward, so keep a detached copy.
        module.weight = module.weight.detach()


def fold_masks(model: nn.Module) -> None:
    """Make the masks permanent: plain ``weight`` parameters with exact zeros, no hooks."""
    for module in model.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")


def count_nonzero(model: nn.Module, layers: Sequence[str]) -> tuple[int, int]:
    """``(nonzero, total)`` weights over the named layers, as ``forward`` sees them."""
    nonzero = total = 0
    for w in weights(model, layers).values():
        nonzero += int(torch.count_nonzero(w))
        total += w.numel()
    return nonzero, total


def layer_sparsity(model: nn.Module, layers: Sequence[str]) -> dict[str, float]:
    """Achieved fraction of exact zeros in each named layer's weight."""
    return {
        name: 1.0 - int(torch.count_nonzero(w)) / w.numel()
        for name, w in weights(model, layers).items()
    }
