"""Structured pruning: the contract every channel criterion and architecture passes, groups,
block removal, and structured trials end to end."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from conftest import TinyCNN, fake_stats, tiny_resnet
from torch import nn

import autoprune
from autoprune import Policy, SpecError, TaskError, prune_and_finetune
from autoprune.pruning.calibration import LayerStats
from autoprune.pruning.criteria import criteria_for, get_criterion
from autoprune.pruning.sizes import predict_params
from autoprune.pruning.structured import (
    Plan,
    apply_plan,
    channel_groups,
    plan,
    prune_structured,
    removable_blocks,
    zero_channels,
)
from autoprune.tasks.digits import DigitsCNN, digits_mlp_model
from autoprune.tasks.resnet import ResNet

CHANNEL_CRITERIA = criteria_for("structured")


def tiny_flat_resnet() -> nn.Module:
    """As digits-resnet: no stage halves the resolution."""
    return ResNet(in_channels=1, widths=(6, 8), blocks_per_stage=2, classes=3, downsample=False)


class TinyMobileNet(nn.Module):
    """A stem and a MobileNetV2 inverted residual: 1x1 expansion, 3x3 depthwise (its channels
    coupled to the expansion's), 1x1 projection back onto the residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(6, 12, 1, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU6(),
            nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU6(),
            nn.Conv2d(12, 6, 1, bias=False),
            nn.BatchNorm2d(6),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.block(x))


# The built-in tasks' architectures (the real CNN and MLP are small already), tiny versions,
# and a depthwise-separable block as in the phone models structured pruning is for.
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "tiny-cnn": (TinyCNN, (1, 8, 8)),
    "digits-cnn": (DigitsCNN, (1, 8, 8)),
    "digits-mlp": (digits_mlp_model, (64,)),
    "tiny-resnet": (tiny_resnet, (1, 8, 8)),
    "tiny-flat-resnet": (tiny_flat_resnet, (1, 8, 8)),
    "tiny-mobilenet": (TinyMobileNet, (1, 8, 8)),
}


def build(arch: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """An untrained model with random BatchNorm statistics (so that they matter), and inputs."""
    factory, shape = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = factory()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    return model.eval(), torch.rand(5, *shape)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("criterion", CHANNEL_CRITERIA)
def test_structured_policy_contract(arch: str, criterion: str) -> None:
    """Every structured policy gives a smaller model that runs, has the predicted parameter
    count, and before fine-tuning computes what the masked model computes."""
    model, x = build(arch)
    groups = channel_groups(model, x[:2])
    assert groups, "every built-in architecture has channel groups"
    ratios = (0.3, 0.75, 0.5, 0.0, 0.9, 0.6)
    sparsity = {g.name: ratios[i % len(ratios)] for i, g in enumerate(groups)}
    policy = Policy(sparsity, criterion=criterion, granularity="structured", round_to=2)
    if get_criterion(criterion).channel_source == "batchnorm" and not all(
        g.batchnorms for g in groups
    ):
        with pytest.raises(TaskError, match=rf"criterion '{criterion}' .* has no BatchNorm"):
            plan(model, policy, groups, fake_stats(model, autoprune.pruning.masks.PRUNABLE_TYPES))
        return
    torch.manual_seed(0)
    result = plan(model, policy, groups, fake_stats(model, autoprune.pruning.masks.PRUNABLE_TYPES))
    modules = dict(model.named_modules())
    for group in groups:
        removed = result.channels.get(group.name, ())
        kept = group.channels - len(removed)
        assert kept >= 1 and (kept % 2 == 0 or kept == group.channels)
        assert abs(kept - (1 - sparsity[group.name]) * group.channels) <= 2

    pruned = apply_plan(copy.deepcopy(model), result, x[:2])
    masked = zero_channels(copy.deepcopy(model), result, x[:2])
    with torch.no_grad():
        out, expected = pruned(x), masked(x)
    assert out.shape == model(x).shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) == predict_params(model, result, x[:2])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    new_modules = dict(pruned.named_modules())
    for group in groups:
        removed = result.channels.get(group.name, ())
        for layer in group.layers:  # the channels are gone, not zeroed
            assert new_modules[layer].weight.shape[0] == group.channels - len(removed)
        assert modules[group.name].weight.shape[0] == group.channels  # the model is untouched


@pytest.mark.parametrize("criterion", CHANNEL_CRITERIA)
def test_channel_criterion_contract(criterion: str) -> None:
    """One finite, non-negative score per output channel, seeded, inputs left untouched."""
    chosen = get_criterion(criterion, "structured")
    assert chosen.channel_score is not None
    # A layer's weight (output channels first), or a BatchNorm's scale.
    shapes = [(4,)] if chosen.channel_source == "batchnorm" else [(6, 3, 3, 3), (5, 7)]
    for shape in shapes:
        weight = torch.randn(shape)
        before = weight.clone()
        norm = torch.rand(1, *shape[1:2], *(1,) * len(shape[2:]))
        stats = LayerStats(torch.rand(shape), torch.rand(shape), norm)
        given = LayerStats(**{k: getattr(stats, k) for k in chosen.needs})
        torch.manual_seed(3)
        first = chosen.channel_score(weight, given)
        torch.manual_seed(3)
        second = chosen.channel_score(weight, given)
        assert first.shape == (shape[0],)
        assert torch.isfinite(first).all() and (first >= 0).all()
        assert torch.equal(first, second) and torch.equal(weight, before)


def test_channel_criteria_formulas() -> None:
    w = torch.tensor([[1.0, -2.0], [0.5, 0.5], [1.0, -2.1]])
    score = {name: get_criterion(name).channel_score for name in CHANNEL_CRITERIA}
    none = LayerStats()
    assert torch.allclose(score["l1"](w, none), torch.tensor([3.0, 1.0, 3.1]))  # type: ignore[misc]
    assert torch.allclose(score["l2"](w, none), w.norm(dim=1))  # type: ignore[misc]
    g = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    taylor = score["taylor"](w, LayerStats(grad=g))  # type: ignore[misc]
    assert torch.allclose(taylor, torch.tensor([3.0, 1.0, 0.0]))
    # Wanda: |w_ij| * ||X_j|| summed over the channel's row; Fisher: w^2 * E[g^2] summed.
    wanda = score["wanda"](w, LayerStats(input_norm=torch.tensor([[2.0, 0.5]])))  # type: ignore[misc]
    assert torch.allclose(wanda, torch.tensor([3.0, 1.25, 3.05]))
    fisher = score["fisher"](w, LayerStats(grad_sq=g))  # type: ignore[misc]
    assert torch.allclose(fisher, torch.tensor([5.0, 0.5, 0.0]))
    # FPGM: the filter between the two others (the geometric median) is the most replaceable.
    middle = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    assert int(score["fpgm"](middle, none).argmin()) == 1  # type: ignore[misc]


def test_unstructured_only_criteria_are_refused_for_structured_policies() -> None:
    with pytest.raises(SpecError, match=r"criterion 'magnitude' cannot score structured"):
        Policy({"a": 0.5}, criterion="magnitude", granularity="structured")
    with pytest.raises(SpecError, match=r"criterion 'l1' cannot score unstructured"):
        Policy({"a": 0.5}, criterion="l1")
    with pytest.raises(SpecError, match=r"round_to and removed_blocks need granularity"):
        Policy({"a": 0.5}, round_to=8)


def test_policy_round_trip_and_old_dicts_load() -> None:
    policy = Policy(
        {"stem.0": 0.5},
        criterion="fpgm",
        granularity="structured",
        round_to=4,
        removed_blocks=("stages.0.1",),
    )
    assert Policy.from_json(policy.to_json()) == policy
    old = {"sparsity": {"x": 0.5}, "criterion": "magnitude", "scope": "layer", "rule": "ratio"}
    loaded = Policy.from_dict({**old, "alpha": 1.0})
    assert loaded.granularity == "unstructured"
    assert loaded.to_dict() == {**old, "alpha": 1.0, "schedule": "oneshot"}


def test_resnet_groups_follow_the_residual_streams() -> None:
    model, x = build("tiny-resnet")
    groups = {g.name: g for g in channel_groups(model, x[:2])}
    stream = groups["stem.0"]
    assert stream.layers == ("stem.0", "stages.0.0.conv2", "stages.0.1.conv2")
    assert set(stream.batchnorms) == {"stem.1", "stages.0.0.bn2", "stages.0.1.bn2"}
    assert "fc" not in groups  # the classes are never removed
    assert set(groups) == {
        "stem.0",
        "stages.0.0.conv1",
        "stages.0.1.conv1",
        "stages.1.0.conv1",
        "stages.1.0.conv2",
        "stages.1.1.conv1",
    }
    assert [g.name for g in channel_groups(model, x[:2], exclude=["stages.1.*"])] == [
        "stem.0",
        "stages.0.0.conv1",
        "stages.0.1.conv1",
    ]


def test_removing_a_block_keeps_its_identity_path() -> None:
    """Removing a block computes what zeroing its residual branch computes."""
    model, x = build("tiny-resnet")
    with pytest.raises(TaskError, match=r"block 'stages.1.0' changes the shape"):
        removable_blocks(model, x[:2], ["stages.*.*"])
    assert removable_blocks(model, x[:2], ["stages.0.*", "stages.1.1"]) == [
        "stages.0.0",
        "stages.0.1",
        "stages.1.1",
    ]
    removed = apply_plan(copy.deepcopy(model), Plan({}, ("stages.0.1",)), x[:2])
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.stages[0][1].bn2.weight.zero_()
        zeroed.stages[0][1].bn2.bias.zero_()
        torch.testing.assert_close(removed(x), zeroed(x))
    assert isinstance(removed.stages[0][1], nn.Identity)


def test_blocks_and_channels_together_have_the_predicted_size() -> None:
    model, x = build("tiny-resnet")
    groups = channel_groups(model, x[:2])
    policy = Policy(
        {g.name: 0.5 for g in groups},
        criterion="l1",
        granularity="structured",
        removed_blocks=("stages.0.1", "stages.1.1"),
    )
    pruned = copy.deepcopy(model)
    result = prune_structured(pruned, policy, x[:2], groups=groups)
    # The removed blocks' own groups are gone from the plan; their layers do not vote.
    assert not any(name.startswith(("stages.0.1.", "stages.1.1.")) for name in result.channels)
    assert sum(p.numel() for p in pruned.parameters()) == predict_params(model, result, x[:2])
    assert pruned(x).shape == (5, 3)
    with pytest.raises(TaskError, match=r"changes the shape"):
        prune_structured(
            copy.deepcopy(model), dataclasses.replace(policy, removed_blocks=("stages.1.0",)), x
        )


def test_plan_refuses_unknown_groups() -> None:
    model, x = build("tiny-cnn")
    policy = Policy({"classifier.3": 0.5}, criterion="l1", granularity="structured")
    with pytest.raises(TaskError, match=r"channel group 'classifier.3', which the model"):
        plan(model, policy, channel_groups(model, x[:2]))


@pytest.mark.parametrize("criterion", ["taylor", "wanda", "fisher"])
def test_structured_trial_end_to_end(resnet_task: autoprune.Task, criterion: str) -> None:
    # Each criterion with calibration statistics, measured in the trial.
    groups = [g.name for g in channel_groups(resnet_task.model, resnet_task.val[0][:2])]
    policy = Policy(
        dict.fromkeys(groups, 0.5),
        criterion=criterion,
        granularity="structured",
        removed_blocks=("stages.1.1",),
    )
    first = prune_and_finetune(resnet_task, policy, seed=4)
    second = prune_and_finetune(resnet_task, policy, seed=4)
    assert first.metrics == second.metrics and first.history == second.history
    assert first.plan is not None and first.plan.removed_blocks == ("stages.1.1",)
    dense = sum(p.numel() for p in resnet_task.model.parameters())
    assert sum(p.numel() for p in first.model.parameters()) < dense / 2
    assert first.metrics["density"] < 0.5
    assert first.layer_sparsity["stages.1.1.conv1"] == 1.0  # removed with its block
    assert 0.0 < first.metrics["accuracy"] <= 1.0
    # Fine-tuning trains the smaller model: no masks, no hooks.
    assert all(not m._forward_pre_hooks for m in first.model.modules())
