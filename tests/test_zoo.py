"""Structured pruning of zoo architectures through the public path digits-resnet takes:
torchvision's ResNet-18 and MobileNetV3 (skipped without torchvision), timm models (skipped
without timm), and a timm-style network written here that runs everywhere: squeeze-excitation,
Hardswish and SiLU, depthwise and grouped convolutions, projection shortcuts, a channels-last
LayerNorm with a layer scale, and a classifier behind dropout."""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import fake_stats, make_data
from torch import Tensor, nn
from torch.nn import functional as F

import autoprune
from autoprune import Policy, SearchSpace, Task, export, load
from autoprune.measure import Context, Latency, macs
from autoprune.pruning.sizes import predict_macs, predict_params
from autoprune.pruning.structured import (
    ChannelGroup,
    Plan,
    apply_plan,
    channel_groups,
    kept_channels,
    plan,
    prune_structured,
    removable_blocks,
    zero_channels,
)
from autoprune.train import evaluate, fit


class SqueezeExcite(nn.Module):
    """timm's SqueezeExcite: the channels, scaled by a gate computed from their means."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(scale)


class InvertedResidual(nn.Module):
    """EfficientNet's MBConv: 1x1 expansion, depthwise 3x3, squeeze-excitation, projection."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.Hardswish(inplace=True)
        self.se = SqueezeExcite(mid, max(1, cin // 2))
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.bn3(self.conv_pwl(self.se(self.act2(self.bn2(self.conv_dw(out))))))
        return x + out if self.has_skip else out


class Bottleneck(nn.Module):
    """ResNeXt's bottleneck: a grouped 3x3 between two 1x1s; a projection when the shape
    changes."""

    def __init__(self, cin: int, cout: int, mid: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        return self.act(self.bn3(self.conv3(out)) + shortcut)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, a channels-last LayerNorm and MLP, a layer scale (a bare
    Parameter), and the residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)))
        return x + (out * self.gamma).permute(0, 3, 1, 2)


class TimmStyleNet(nn.Module):
    """A stem, MBConv, ResNeXt and (``convnext``) ConvNeXt stages, a 1x1 head and a classifier
    behind dropout, named as timm names them."""

    def __init__(self, in_chans: int = 1, num_classes: int = 3, convnext: bool = True) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(in_chans, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.SiLU(inplace=True)
        stages: list[nn.Module] = [
            nn.Sequential(InvertedResidual(8, 8, 2), InvertedResidual(8, 12, 2, stride=2)),
            nn.Sequential(Bottleneck(12, 16, 8, groups=2), Bottleneck(16, 16, 8, groups=2)),
        ]
        width = 16
        if convnext:
            stages.append(nn.Sequential(LayerNorm2d(16), nn.Conv2d(16, 24, 2, stride=2)))
            stages.append(nn.Sequential(ConvNeXtBlock(24), ConvNeXtBlock(24)))
            width = 24
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(width, 32, 1)
        self.act2 = nn.GELU()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.global_pool(self.act2(self.conv_head(self.blocks(x)))).flatten(1)
        return self.classifier(self.drop(x))


# The blocks of TimmStyleNet that keep their input's shape (an identity shortcut).
TIMM_STYLE_BLOCKS = ["blocks.0.0", "blocks.1.1", "blocks.3.*"]


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode, its BatchNorm statistics and affines random, so they matter."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.3, 0.3, generator=g)
    return model.eval()


def check_pruned(
    model: nn.Module,
    x: Tensor,
    policy: Policy,
    *,
    masked_equal: bool = True,
    groups: list[ChannelGroup] | None = None,
) -> tuple[nn.Module, Plan]:
    """Plan ``policy`` on ``model`` and apply it to a copy; check that the copy runs, has the
    predicted parameters and MACs (fewer than the dense model's), keeps whole parts of grouped
    layers, and (``masked_equal``: no LayerNorm sees the removed channels) computes what the
    masked model computes. Return the copy and the plan."""
    groups = groups if groups is not None else channel_groups(model, x[:2])
    torch.manual_seed(0)
    result = plan(model, policy, groups, fake_stats(model, (nn.Linear, nn.Conv2d)))
    pruned = apply_plan(copy.deepcopy(model), result, x[:2]).eval()
    with torch.no_grad():
        out = pruned(x)
        dense = model(x)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    params = sum(p.numel() for p in pruned.parameters())
    assert params == predict_params(model, result, x[:2])
    assert params < sum(p.numel() for p in model.parameters())
    context = Context(x[:1], ())
    assert macs(pruned, context) == predict_macs(model, result, x[:2])
    assert macs(pruned, context) < macs(model, context) == predict_macs(model, Plan({}), x[:2])
    for group in groups:
        removed = result.channels.get(group.name, ())
        run = group.channels // group.parts
        offsets = [
            sorted(i - k * run for i in removed if k * run <= i < (k + 1) * run)
            for k in range(group.parts)
        ]
        assert all(o == offsets[0] for o in offsets), group.name  # every part alike
        kept = group.channels - len(removed)
        assert kept % policy.round_to == 0 or kept == group.channels
    if masked_equal:
        masked = zero_channels(copy.deepcopy(model), Plan(result.channels), x[:2])
        with torch.no_grad():
            torch.testing.assert_close(out, masked(x), rtol=1e-4, atol=1e-5)
    return pruned, result


# --- a timm-style network: runs everywhere -------------------------------------------------


def test_timm_style_channel_groups() -> None:
    """Depthwise convolutions and squeeze-excitation gates join the group of the layer that
    feeds them, residual streams join their projections, grouped convolutions split their
    groups into parts, a layer scale follows its stream, and the classes are never pruned."""
    model, x = randomized(TimmStyleNet()), torch.rand(2, 1, 8, 8)
    groups = {g.name: g for g in channel_groups(model, x)}
    assert list(groups) == [
        "conv_stem",
        "blocks.0.0.conv_pw",
        "blocks.0.0.se.conv_reduce",
        "blocks.0.1.conv_pw",
        "blocks.0.1.se.conv_reduce",
        "blocks.0.1.conv_pwl",
        "blocks.1.0.conv1",
        "blocks.1.0.conv2",
        "blocks.1.0.conv3",
        "blocks.1.1.conv1",
        "blocks.1.1.conv2",
        "blocks.2.1",
        "blocks.3.0.mlp.fc1",
        "blocks.3.1.mlp.fc1",
        "conv_head",
    ]
    assert groups["conv_stem"].layers == ("conv_stem", "blocks.0.0.conv_pwl")
    expand = groups["blocks.0.0.conv_pw"]
    assert expand.layers == (
        "blocks.0.0.conv_pw",
        "blocks.0.0.conv_dw",
        "blocks.0.0.se.conv_expand",
    )
    assert expand.batchnorms == ("blocks.0.0.bn1", "blocks.0.0.bn2") and expand.parts == 1
    stream = groups["blocks.1.0.conv3"]
    assert stream.layers == ("blocks.1.0.conv3", "blocks.1.0.downsample.0", "blocks.1.1.conv3")
    assert {name: g.parts for name, g in groups.items() if g.parts > 1} == {
        "blocks.1.0.conv1": 2,  # feeds a grouped convolution
        "blocks.1.0.conv2": 2,  # comes out of one
        "blocks.1.1.conv1": 2,
        "blocks.1.1.conv2": 2,
    }
    assert groups["blocks.2.1"].layers == (
        "blocks.2.1",
        "blocks.3.0.conv_dw",
        "blocks.3.0.mlp.fc2",
        "blocks.3.1.conv_dw",
        "blocks.3.1.mlp.fc2",
    )
    assert removable_blocks(model, x, TIMM_STYLE_BLOCKS) == [
        "blocks.0.0",
        "blocks.1.1",
        "blocks.3.0",
        "blocks.3.1",
    ]


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "taylor", "random"])
def test_timm_style_structured_contract(criterion: str) -> None:
    """Every channel criterion prunes the network to a smaller one that runs, has the
    predicted parameters and MACs, and (without LayerNorm) computes what the masked one does."""
    for convnext in (False, True):
        model, x = randomized(TimmStyleNet(convnext=convnext)), torch.rand(5, 1, 8, 8)
        groups = channel_groups(model, x[:2])
        ratios = (0.3, 0.75, 0.5, 0.0, 0.9, 0.6)
        sparsity = {g.name: ratios[i % len(ratios)] for i, g in enumerate(groups)}
        policy = Policy(sparsity, criterion=criterion, granularity="structured", round_to=2)
        check_pruned(model, x, policy, masked_equal=not convnext, groups=groups)


def test_grouped_convolutions_lose_the_same_channels_in_every_group() -> None:
    """Regression: a grouped (not depthwise) convolution's input channels are removed by their
    offset within a group, so every group must lose the same offsets. Before, the best-scored
    channels were kept wherever they were, and torch-pruning failed (or pruned the wrong
    weights)."""
    model, x = randomized(TimmStyleNet(convnext=False)), torch.rand(5, 1, 8, 8)
    groups = channel_groups(model, x[:2])
    policy = Policy(
        {"blocks.1.0.conv1": 0.5, "blocks.1.0.conv2": 0.25},
        criterion="l1",
        granularity="structured",
    )
    pruned, result = check_pruned(model, x, policy, groups=groups)
    removed = result.channels["blocks.1.0.conv1"]
    assert len(removed) == 4 and [i + 4 for i in removed[:2]] == list(removed[2:])
    assert len(result.channels["blocks.1.0.conv2"]) == 2
    conv2 = pruned.blocks[1][0].conv2
    assert (conv2.groups, conv2.in_channels, conv2.out_channels) == (2, 4, 6)
    # Rounding: each part keeps a multiple of round_to / gcd(round_to, parts) channels.
    assert kept_channels(8, 0.5, round_to=4, parts=2) == 4
    assert kept_channels(8, 0.4, round_to=4, parts=2) == 4
    assert kept_channels(8, 0.3, round_to=4, parts=2) == 8  # 3 per part rounds up to 4
    assert kept_channels(24, 0.5, round_to=16, parts=3) == 24  # 3 parts of 8 keep all
    rounded = Policy(
        {"blocks.1.0.conv1": 0.4}, criterion="l1", granularity="structured", round_to=4
    )
    assert len(plan(model, rounded, groups).channels["blocks.1.0.conv1"]) == 8 - 4


def test_layer_norms_and_layer_scales_are_counted() -> None:
    """Regression: the parameter prediction counted only BatchNorms, so a pruned ConvNeXt
    stage (LayerNorm affines, a layer scale) was bigger than predicted."""
    model, x = randomized(TimmStyleNet()), torch.rand(3, 1, 8, 8)
    groups = channel_groups(model, x[:2])
    policy = Policy({"blocks.2.1": 0.5}, criterion="l1", granularity="structured")
    pruned, _ = check_pruned(model, x, policy, masked_equal=False, groups=groups)
    block = pruned.blocks[3][0]
    assert block.gamma.shape == (12,) and block.norm.weight.shape == (12,)
    assert block.conv_dw.groups == 12 and block.mlp.fc1.in_features == 12


def timm_style_task() -> Task:
    """TimmStyleNet trained briefly on conftest's three-class images (about a second)."""
    torch.manual_seed(0)
    model = TimmStyleNet()
    task = Task(
        model=model,
        train=make_data(192, 0),
        val=make_data(96, 1),
        test=make_data(96, 2),
        finetune_epochs=1,
        lr=3e-3,
        batch_size=32,
        name="timm-style",
    )
    fit(model, task, epochs=4, seed=0)
    return task


def search_and_export(task: Task, space: SearchSpace, tmp_path: Path) -> None:
    """Search ``task`` structurally as the digits-resnet spec does (macs and latency), export
    the smallest front trial, and check that its export reloads from the plan to the recorded
    accuracy and MACs."""
    study = autoprune.search(
        task,
        n_trials=3,
        seed=0,
        space=space,
        warm_start=None,
        objectives=["accuracy", "macs", "latency_ms"],
        latency=Latency(batch_size=4, repeats=2, warmup=1),
    )
    trials = [t for t in study.trials if t.values is not None]
    assert len(trials) == 3
    dense_macs = macs(task.model, Context(task.val[0][:1], ()))
    assert all(t.values[1] < dense_macs for t in trials)
    trial = min(study.best_trials, key=lambda t: t.values[1])
    done = export(study, trial.number, tmp_path / "best", task=task)
    manifest = json.loads((done.directory / "export.json").read_text())
    assert manifest["plan"]["channels"]
    assert manifest["example"]["items"][0]["shape"] == [1, *task.val[0].shape[1:]]
    loaded = load(done.directory, base=task.model)
    assert evaluate(loaded, task, "val")[0] == trial.values[0]
    assert done.metrics["macs"] == macs(loaded, Context(task.val[0][:1], ())) == trial.values[1]
    assert sum(p.numel() for p in loaded.parameters()) == done.metrics["model_params"]


@pytest.mark.slow
def test_timm_style_search_exports_and_reloads(tmp_path: Path) -> None:
    space = SearchSpace(
        granularities=["structured"],
        channel_criteria=["l1", "taylor"],
        channel_sparsity=(0.2, 0.8),
        round_to=2,
        blocks=TIMM_STYLE_BLOCKS,
    )
    search_and_export(timm_style_task(), space, tmp_path)


# --- torchvision and timm: only where they import --------------------------------------------


def import_or_skip(name: str, why: str) -> Any:
    """Module ``name``, or skip the test saying ``why``. Not ``pytest.importorskip`` alone: a
    torchvision built for another torch is installed but fails with a RuntimeError."""
    pytest.importorskip(name.partition(".")[0], reason=f"{why}: not installed")
    try:
        return importlib.import_module(name)
    except Exception as e:  # e.g. "operator torchvision::nms does not exist"
        pytest.skip(f"{why}: it does not import ({type(e).__name__}: {e})")


def torchvision_models() -> Any:
    return import_or_skip("torchvision.models", "torchvision models are tested with torchvision")


def vision_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """conftest's three-class 8x8 images, upsampled to 3x32x32 (the size of CIFAR)."""
    x, y = make_data(n, seed)
    return F.interpolate(x, size=32, mode="bilinear").repeat(1, 3, 1, 1), y


# Each torchvision model: its channel groups, globs of its blocks with an identity shortcut,
# and how many blocks they match.
TORCHVISION = {
    "resnet18": (12, ["layer*.1"], 4),
    "mobilenet_v3_small": (27, ["features.[3568]", "features.1[01]"], 6),
}


def torchvision_model(name: str) -> nn.Module:
    models = torchvision_models()
    torch.manual_seed(0)
    build: Callable[..., nn.Module] = getattr(models, name)
    return randomized(build(weights=None, num_classes=3))


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_models_prune_structurally(name: str) -> None:
    model, x = torchvision_model(name), vision_data(4, 0)[0]
    groups = channel_groups(model, x[:2])
    n_groups, block_globs, n_blocks = TORCHVISION[name]
    assert len(groups) == n_groups and all(g.parts == 1 for g in groups)
    last = list(dict(model.named_modules()))[-1]
    assert last not in {g.name for g in groups}  # the classes stay
    blocks = removable_blocks(model, x[:2], block_globs)
    assert len(blocks) == n_blocks
    policy = Policy(
        {g.name: 0.5 for g in groups}, criterion="l2", granularity="structured", round_to=8
    )
    check_pruned(model, x, policy, groups=groups)
    # Whole blocks go too, and the rest of the model still runs with the predicted size.
    with_blocks = Policy(
        {g.name: 0.5 for g in groups},
        criterion="fpgm",
        granularity="structured",
        round_to=8,
        removed_blocks=tuple(blocks[::2]),
    )
    pruned = copy.deepcopy(model)
    result = prune_structured(pruned, with_blocks, x[:2], groups=groups)
    assert sum(p.numel() for p in pruned.parameters()) == predict_params(model, result, x[:2])
    assert macs(pruned, Context(x[:1], ())) == predict_macs(model, result, x[:2])
    assert all(isinstance(pruned.get_submodule(b), nn.Identity) for b in blocks[::2])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_search_exports_and_reloads(name: str, tmp_path: Path) -> None:
    model = torchvision_model(name)
    task = Task(
        model=model,
        train=vision_data(64, 0),
        val=vision_data(32, 1),
        finetune_epochs=1,
        batch_size=32,
        name=name,
    )
    space = SearchSpace(
        granularities=["structured"],
        channel_criteria=["l1", "bn_scale"],
        channel_sparsity=(0.3, 0.7),
        round_to=8,
        # Squeeze-excitation and MobileNet's hidden classifier layer: no BatchNorm to score.
        exclude=["*.fc1", "classifier.*"],
        blocks=TORCHVISION[name][1],
    )
    search_and_export(task, space, tmp_path)


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_atto", "regnetx_002"])
def test_timm_models_prune_structurally(name: str) -> None:
    """timm's own models (depthwise + SE, LayerNorm + layer scale, grouped convolutions)."""
    timm = import_or_skip("timm", "timm models are tested with timm (which needs torchvision)")
    torch.manual_seed(0)
    model = randomized(timm.create_model(name, pretrained=False, num_classes=3))
    x = vision_data(3, 0)[0]
    groups = channel_groups(model, x[:2])
    assert (name == "regnetx_002") == any(g.parts > 1 for g in groups)
    policy = Policy(
        {g.name: 0.5 for g in groups}, criterion="l1", granularity="structured", round_to=4
    )
    check_pruned(model, x, policy, masked_equal=name != "convnext_atto", groups=groups)
