"""Allocations: exact targets, each heuristic's definition, and reallocation by offsets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autoprune import Policy, SpecError, Task
from autoprune.pruning.allocation import (
    ALLOCATIONS,
    OFFSET_FACTOR,
    allocate,
    erk,
    get_allocation,
    heuristic_policy,
    lamp,
    reallocate,
    register_allocation,
)
from autoprune.pruning.masks import compute_masks, prunable_layers, score


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 32), nn.Linear(32, 3))


LAYERS = ["0", "2", "3"]
SIZES = {"0": 36, "2": 4608, "3": 96}


@pytest.mark.parametrize("name", list(ALLOCATIONS))
@pytest.mark.parametrize("target", [0.0, 0.3, 0.9, 0.98, 0.999])
def test_every_allocation_prunes_exactly_the_target(name: str, target: float) -> None:
    sparsity = allocate(name, _model(), LAYERS, target)
    pruned = {k: round(s * SIZES[k]) for k, s in sparsity.items()}
    assert all(math.isclose(pruned[k], sparsity[k] * SIZES[k]) for k in LAYERS)  # exact counts
    assert sum(pruned.values()) == round(target * sum(SIZES.values()))
    assert all(pruned[k] <= SIZES[k] - 1 for k in LAYERS)  # every layer keeps a weight
    Policy(sparsity=sparsity)  # valid


def test_global_allocation_gives_the_global_scope_masks() -> None:
    model = _model()
    global_policy = Policy(sparsity=dict.fromkeys(LAYERS, 0.8), scope="global")
    expected = compute_masks(global_policy, score(model, global_policy))
    policy = heuristic_policy("global", model, LAYERS, 0.8)
    assert policy.scope == "layer" and policy.criterion == "magnitude"
    masks = compute_masks(policy, score(model, policy))
    assert all(torch.equal(masks[k], expected[k]) for k in LAYERS)


def test_uniform_allocation_is_the_same_everywhere() -> None:
    sparsity = allocate("uniform", _model(), LAYERS, 0.5)
    assert sparsity == {"0": 0.5, "2": 0.5, "3": 0.5}


def test_lamp_scores_by_hand() -> None:
    # Sorted |w| = 4, 3, 2, 1: scores 16/16, 9/25, 4/29, 1/30. Layer b's tied weights share
    # the denominator (">="): 1/2 each, however small they are, so a loses its weights first.
    weights = {"a": torch.tensor([1.0, -4.0, 2.0, 3.0]), "b": torch.tensor([0.01, 0.01])}
    assert lamp(weights, 2 / 6) == {"a": 2, "b": 0}
    assert lamp(weights, 3 / 6) == {"a": 3, "b": 0}


def test_lamp_ignores_the_scale_of_a_layer() -> None:
    model = _model()
    before = allocate("lamp", model, LAYERS, 0.9)
    with torch.no_grad():
        model[3].weight.mul_(100.0)
    assert allocate("lamp", model, LAYERS, 0.9) == before
    assert allocate("global", model, LAYERS, 0.9) != allocate("global", _model(), LAYERS, 0.9)


def test_erk_densities_follow_the_shapes_and_cap_at_one() -> None:
    weights = {"conv": torch.zeros(4, 1, 3, 3), "fc": torch.zeros(32, 144)}
    pruned = erk(weights, 0.5)
    # raw densities: (4+1+3+3)/36 and 176/4608; conv would exceed 1, so it stays dense.
    assert pruned["conv"] == 0
    assert pruned["fc"] == round(0.5 * (36 + 4608))
    pruned = erk(weights, 0.9)
    kept = {k: w.numel() - pruned[k] for k, w in weights.items()}
    assert sum(kept.values()) == 4644 - round(0.9 * 4644)
    ratio = (kept["conv"] / 36) / (kept["fc"] / 4608)
    assert ratio == pytest.approx((11 / 36) / (176 / 4608), rel=0.02)


def test_reallocate_with_zero_offsets_keeps_the_allocation() -> None:
    base = allocate("lamp", _model(), LAYERS, 0.9)
    assert reallocate(base, SIZES, dict.fromkeys(LAYERS, 0.0), 0.9) == base


@pytest.mark.parametrize(
    ("offsets", "reference"), [({"2": -1.0}, "3"), ({"0": 0.5, "3": -0.5}, "2")]
)
def test_offsets_move_density_and_still_hit_the_target(
    offsets: dict[str, float], reference: str
) -> None:
    base = allocate("uniform", _model(), LAYERS, 0.9)  # no layer reaches density 1 here
    moved = reallocate(base, SIZES, offsets, 0.9)
    pruned = {k: round(s * SIZES[k]) for k, s in moved.items()}
    assert sum(pruned.values()) == round(0.9 * sum(SIZES.values()))
    change = {k: (1 - moved[k]) / (1 - base[k]) for k in LAYERS}  # of each layer's density
    for k, offset in offsets.items():
        ratio = change[k] / change[reference]
        assert ratio == pytest.approx(OFFSET_FACTOR**offset, rel=0.15)  # whole weights


def test_unknown_allocation_and_bad_target_are_named() -> None:
    with pytest.raises(SpecError, match=r"^unknown allocation 'lampp' \(known: uniform, global"):
        get_allocation("lampp")
    with pytest.raises(SpecError, match=r"^target sparsity must be in \[0, 1\), got 1.0$"):
        allocate("lamp", _model(), LAYERS, 1.0)


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_allocation("lamp")(lamp)


def test_allocations_work_on_every_prunable_layer_of_a_task(tiny_task: Task) -> None:
    layers = prunable_layers(tiny_task.model)
    for name in ALLOCATIONS:
        assert set(allocate(name, tiny_task.model, layers, 0.95)) == set(layers)
