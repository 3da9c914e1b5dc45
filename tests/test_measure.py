"""Size objectives: one contract for every registered objective, then each one's numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autoprune import Policy, SpecError
from autoprune.measure import (
    OBJECTIVES,
    Context,
    Latency,
    check_granularities,
    check_objectives,
    compare_latency,
    directions,
    macs,
    measure,
    nonzero_params,
)
from autoprune.pruning.masks import apply_masks, fold_masks
from autoprune.pruning.structured import channel_groups, prune_structured

LAYERS = ("0", "2", "4")


def wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    ).eval()


def context() -> Context:
    return Context(torch.rand(1, 64), LAYERS, Latency(batch_size=64, repeats=15, warmup=2))


def structured_copy(model: nn.Module, ratio: float) -> nn.Module:
    pruned, example = copy.deepcopy(model), torch.rand(2, 64)
    groups = channel_groups(pruned, example)
    policy = Policy({g.name: ratio for g in groups}, criterion="l1", granularity="structured")
    prune_structured(pruned, policy, example, groups=groups)
    return pruned


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_contract(name: str) -> None:
    """Finite and positive, leaves the model alone, and a model with 90% of its neurons
    removed is smaller by it; unstructured zeros shrink it exactly when it says it sees them."""
    objective = OBJECTIVES[name]
    dense = wide_mlp()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    value = objective.measure(dense.train(), context())
    assert isinstance(value, float) and value > 0 and value == value
    assert all(torch.equal(state[k], v) for k, v in dense.state_dict().items())
    assert dense.training  # measured in eval mode, the mode restored
    dense.eval()

    pruned = structured_copy(dense, 0.9)
    assert objective.measure(pruned, context()) < 0.5 * value

    if name == "latency_ms":
        return  # timing noise: "unchanged by zeros" cannot be asserted exactly
    zeroed = copy.deepcopy(dense)
    masks = {n: torch.rand(m.weight.shape) > 0.8 for n, m in zeroed.named_modules() if n in LAYERS}
    apply_masks(zeroed, masks)
    fold_masks(zeroed)
    shrunk = objective.measure(zeroed, context()) < value
    assert shrunk == objective.sees_zeros


def test_exact_counts() -> None:
    model = wide_mlp()
    weights = 64 * 512 + 512 * 512 + 512 * 10
    assert nonzero_params(model, context()) == weights
    assert macs(model, context()) == weights  # one multiply-add per weight of a Linear
    pruned = structured_copy(model, 0.5)
    assert macs(pruned, context()) == 64 * 256 + 256 * 256 + 256 * 10
    # A layer that is gone counts nothing.
    assert nonzero_params(model, Context(torch.rand(1, 64), ("0", "missing"))) == 64 * 512


def test_measure_and_directions() -> None:
    names = check_objectives(["accuracy", "macs", "bytes"])
    assert directions(names) == ["maximize", "minimize", "minimize"]
    assert set(measure(wide_mlp(), names, context())) == {"macs", "bytes"}


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["macs"], "objectives must be a list starting with 'accuracy', got ['macs']"),
        ("accuracy", "objectives must be a list starting with 'accuracy', got 'accuracy'"),
        (["accuracy"], "one or two distinct size objectives"),
        (["accuracy", "macs", "macs"], "one or two distinct size objectives"),
        (["accuracy", "flops"], "unknown objective 'flops' (known: accuracy, nonzero_params,"),
    ],
)
def test_bad_objectives_are_named(names: object, message: str) -> None:
    with pytest.raises(SpecError) as info:
        check_objectives(names)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_macs_and_latency_need_structured_granularity() -> None:
    check_granularities(["accuracy", "bytes"], ["unstructured", "structured"])
    check_granularities(["accuracy", "macs"], ["structured"])
    with pytest.raises(SpecError, match=r"^objective 'latency_ms' is blind to unstructured zeros"):
        check_granularities(["accuracy", "latency_ms"], ["unstructured", "structured"])


def test_latency_settings() -> None:
    assert Latency.from_dict({"batch_size": 1, "threads": 2}).to_dict() == {
        "batch_size": 1,
        "threads": 2,
        "repeats": 20,
        "warmup": 3,
    }
    with pytest.raises(SpecError, match=r"^latency threads must be an integer >= 1, got 0$"):
        Latency(threads=0)
    with pytest.raises(SpecError, match=r"^unknown latency key 'thread'"):
        Latency.from_dict({"thread": 1})


def test_compare_latency_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    times = compare_latency(
        [wide_mlp(), nn.Identity()], torch.rand(1, 64), Latency(threads=2, repeats=3)
    )
    assert len(times) == 2 and all(t > 0 for t in times)
    assert torch.get_num_threads() == before
