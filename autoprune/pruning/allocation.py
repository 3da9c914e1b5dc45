"""Allocations: how a global target sparsity is split between layers.

The heuristics from the literature are registered here by name, each a function
``(weights, target) -> pruned count per layer`` that prunes exactly ``round(target * total)``
weights and keeps at least one weight in every layer:

- ``uniform``: every layer loses the same fraction (layerwise magnitude pruning).
- ``global``: one magnitude threshold over all layers (Blalock et al. 2020).
- ``lamp``: one threshold over LAMP scores (Lee et al., ICLR 2021).
- ``erk``: Erdős–Rényi-kernel densities (Evci et al. 2020), scaled to the target.

Within a layer the weights are then ranked by the policy's criterion, so that
``heuristic_policy(...)`` with the magnitude criterion reproduces each heuristic's masks.
:func:`reallocate` moves an allocation's densities by per-layer offsets while still pruning
exactly the target: the search's ``allocation`` parametrization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from autoprune._registry import Registry
from autoprune.errors import SpecError
from autoprune.pruning.masks import compute_masks, weights
from autoprune.pruning.policy import Policy

# ``(weights by layer, target sparsity) -> pruned weights by layer``
AllocationFn = Callable[[Mapping[str, Tensor], float], dict[str, int]]

ALLOCATIONS: Registry[AllocationFn] = Registry("allocation")

# A layer's density may move by up to this factor either way with an offset of +-1.
OFFSET_FACTOR = 4.0


def register_allocation(name: str) -> Callable[[AllocationFn], AllocationFn]:
    """Decorator that adds an allocation function to the registry under ``name``."""

    def decorator(fn: AllocationFn) -> AllocationFn:
        return ALLOCATIONS.register(name, fn)

    return decorator


def get_allocation(name: str) -> AllocationFn:
    """The registered allocation ``name``; raise SpecError naming it if unknown."""
    return ALLOCATIONS.get(name)


def allocate(
    name: str, model: nn.Module, layers: Sequence[str], target: float
) -> dict[str, float]:
    """Per-layer sparsities of allocation ``name`` pruning ``target`` of ``layers``' weights.

    The fractions are exact counts (``pruned / size``), so a ``ratio`` policy built from them
    prunes exactly ``round(target * total)`` weights.

    Raises:
        SpecError: On an unknown allocation or a target outside [0, 1).
    """
    _check_target(target)
    fn = get_allocation(name)
    found = {k: w.detach() for k, w in weights(model, layers).items()}
    counts = fn(found, target)
    return {k: counts[k] / found[k].numel() for k in layers}


def heuristic_policy(name: str, model: nn.Module, layers: Sequence[str], target: float) -> Policy:
    """The one-shot baseline: allocation ``name`` at ``target``, magnitude within each layer."""
    return Policy(sparsity=allocate(name, model, layers, target), criterion="magnitude")


def reallocate(
    sparsity: Mapping[str, float],
    sizes: Mapping[str, int],
    offsets: Mapping[str, float],
    target: float,
) -> dict[str, float]:
    """Move each layer's density by ``OFFSET_FACTOR ** offset`` and rescale, so that the model
    still prunes exactly ``round(target * total)`` weights (every layer keeps at least one).

    With all offsets zero the allocation is returned as it is (up to rounding).
    """
    _check_target(target)
    layers = list(sparsity)
    logits = {
        k: math.log(max(1.0 - sparsity[k], 1e-9)) + offsets.get(k, 0.0) * math.log(OFFSET_FACTOR)
        for k in layers
    }
    kept_total = sum(sizes.values()) - round(target * sum(sizes.values()))

    def kept(shift: float) -> dict[str, float]:
        return {
            k: min(float(sizes[k]), max(1.0, sizes[k] * math.exp(logits[k] + shift)))
            for k in layers
        }

    low, high = -60.0, 60.0  # densities of e^-60 .. e^60 times the offset ones: all of them
    for _ in range(100):  # bisection on the shared shift of the log-densities
        middle = (low + high) / 2
        if sum(kept(middle).values()) < kept_total:
            low = middle
        else:
            high = middle
    counts = _integer_split(kept(high), kept_total, sizes)
    return {k: (sizes[k] - counts[k]) / sizes[k] for k in layers}


def _integer_split(
    real: Mapping[str, float], total: int, sizes: Mapping[str, int]
) -> dict[str, int]:
    """Integer kept counts near ``real`` summing to ``total``: largest remainders first."""
    counts = {k: max(1, min(sizes[k], math.floor(v))) for k, v in real.items()}
    missing = total - sum(counts.values())
    order = sorted(real, key=lambda k: real[k] - math.floor(real[k]), reverse=missing > 0)
    step = 1 if missing > 0 else -1
    while missing:
        moved = False
        for k in order:
            if missing and 1 <= counts[k] + step <= sizes[k]:
                counts[k] += step
                missing -= step
                moved = True
        if not moved:
            break
    return counts


def _check_target(target: float) -> None:
    if not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise SpecError(f"target sparsity must be in [0, 1), got {target!r}")


def _ranked(scores: Mapping[str, Tensor], target: float) -> dict[str, int]:
    """Pruned counts of one global ranking of ``scores`` (the global scope of
    :func:`autoprune.pruning.masks.compute_masks`), each layer's best weight kept."""
    guarded = {}
    for k, s in scores.items():
        s = s.flatten().float().clone()
        s[torch.argmax(s)] = math.inf
        guarded[k] = s
    policy = Policy(sparsity=dict.fromkeys(scores, target), scope="global")
    masks = compute_masks(policy, guarded)
    return {k: int((~masks[k]).sum()) for k in scores}


@register_allocation("uniform")
def uniform(weights: Mapping[str, Tensor], target: float) -> dict[str, int]:
    """Every layer loses the same fraction of its weights (to the nearest weight)."""
    sizes = {k: w.numel() for k, w in weights.items()}
    kept_total = sum(sizes.values()) - round(target * sum(sizes.values()))
    kept = _integer_split({k: (1.0 - target) * n for k, n in sizes.items()}, kept_total, sizes)
    return {k: sizes[k] - kept[k] for k in sizes}


@register_allocation("global")
def global_magnitude(weights: Mapping[str, Tensor], target: float) -> dict[str, int]:
    """The smallest weights of the whole model, whatever their layer."""
    return _ranked({k: w.abs() for k, w in weights.items()}, target)


@register_allocation("lamp")
def lamp(weights: Mapping[str, Tensor], target: float) -> dict[str, int]:
    """LAMP: ``w^2 / sum of w'^2 over the layer's weights w' with |w'| >= |w|``, ranked
    globally. A layer's relative rank decides, so no layer is emptied by a smaller scale."""
    scores = {}
    for k, w in weights.items():
        squared = w.flatten().float() ** 2
        values, order = torch.sort(squared, descending=True)
        # Ties share the largest denominator, as in the definition (">=").
        suffix = torch.cumsum(values, 0)
        ranks = torch.searchsorted(-values, -values, right=True) - 1
        lamp_sorted = values / suffix[ranks].clamp_min(1e-30)
        s = torch.empty_like(squared)
        s[order] = lamp_sorted
        scores[k] = s
    return _ranked(scores, target)


@register_allocation("erk")
def erk(weights: Mapping[str, Tensor], target: float) -> dict[str, int]:
    """Erdős–Rényi-kernel: a layer's density is proportional to ``sum(shape) / prod(shape)``,
    scaled to the target; layers that would exceed density 1 stay dense and the others share
    the rest."""
    sizes = {k: w.numel() for k, w in weights.items()}
    raw = {k: sum(w.shape) / w.numel() for k, w in weights.items()}
    kept_total = sum(sizes.values()) - round(target * sum(sizes.values()))
    dense: set[str] = set()
    while True:
        sparse = [k for k in sizes if k not in dense]
        budget = kept_total - sum(sizes[k] for k in dense)
        scale = budget / max(sum(raw[k] * sizes[k] for k in sparse), 1e-30)
        capped = {k for k in sparse if scale * raw[k] > 1.0}
        if not capped:
            break
        dense |= capped
    real = {k: float(sizes[k]) if k in dense else scale * raw[k] * sizes[k] for k in sizes}
    kept = _integer_split(real, kept_total, sizes)
    return {k: sizes[k] - kept[k] for k in sizes}
