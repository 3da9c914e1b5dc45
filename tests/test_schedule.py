"""Schedules: the cubic ramp, monotone masks reaching the exact target, regrowth, replay."""

from __future__ import annotations

import copy
import dataclasses

import optuna
import pytest
import torch

from autoprune import Policy, SearchSpace, SpecError, Task, suggest_policy
from autoprune.pruning.masks import count_nonzero, prunable_layers, score
from autoprune.pruning.schedule import AGP_END, SCHEDULE_FUNCTIONS, agp_fraction
from autoprune.train import steps_per_epoch
from autoprune.trial import prune_and_finetune


def test_agp_fraction_is_a_cubic_ramp() -> None:
    assert agp_fraction(0, 100) == 0.0
    assert agp_fraction(50, 100) == pytest.approx(0.875)
    assert agp_fraction(100, 100) == agp_fraction(150, 100) == 1.0
    assert agp_fraction(0, 0) == 1.0


def _masks(model: torch.nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {k: modules[k].weight_mask.bool().clone() for k in layers}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_masks_only_shrink_and_end_at_the_exact_target(
    tiny_task: Task, scope: str
) -> None:
    model = copy.deepcopy(tiny_task.model)
    layers = prunable_layers(model)
    policy = Policy(dict.fromkeys(layers, 0.9), scope=scope, schedule="gradual")
    steps = 40
    hook = SCHEDULE_FUNCTIONS["gradual"](model, policy, score(model, policy), None, steps)
    assert hook is not None
    assert all(bool(m.all()) for m in _masks(model, layers).values())  # starts dense
    before = _masks(model, layers)
    kept = []
    for step in range(steps):
        hook(step, model)
        now = _masks(model, layers)
        assert all(bool((now[k] <= before[k]).all()) for k in layers)  # pruned stay pruned
        kept.append(sum(int(m.sum()) for m in now.values()))
        before = now
    total = sum(m.numel() for m in before.values())
    assert kept[0] < total  # the first update already prunes some
    assert kept == sorted(kept, reverse=True)
    assert kept[int(AGP_END * steps)] == kept[-1] == total - round(0.9 * total)


def test_regrowth_brings_back_a_weight_whose_score_recovers(tiny_task: Task) -> None:
    results = {}
    for name in ("gradual", "gradual-regrow"):
        model = copy.deepcopy(tiny_task.model)
        layers = prunable_layers(model)
        policy = Policy(dict.fromkeys(layers, 0.5), schedule=name)
        hook = SCHEDULE_FUNCTIONS[name](model, policy, score(model, policy), None, 8)
        assert hook is not None
        hook(0, model)
        module = dict(model.named_modules())[layers[-1]]
        pruned = (~module.weight_mask.bool()).nonzero()[0].tolist()
        with torch.no_grad():
            module.weight_orig[tuple(pruned)] = 100.0  # its score recovers
        for step in range(1, 8):
            hook(step, model)
        results[name] = bool(module.weight_mask[tuple(pruned)])
    assert results == {"gradual": False, "gradual-regrow": True}


@pytest.mark.parametrize("criterion", ["taylor", "wanda", "fisher"])
@pytest.mark.parametrize("schedule", ["gradual", "gradual-regrow"])
def test_gradual_trials_reach_the_target_and_replay_exactly(
    tiny_task: Task, schedule: str, criterion: str
) -> None:
    # Criteria with calibration statistics rescore the changing weights with them.
    task = dataclasses.replace(tiny_task, finetune_epochs=2)
    layers = prunable_layers(task.model)
    policy = Policy(dict.fromkeys(layers, 0.8), criterion=criterion, schedule=schedule)
    first = prune_and_finetune(task, policy, seed=5)
    nonzero, total = count_nonzero(first.model, layers)
    assert nonzero == total - sum(round(0.8 * n) for n in _sizes(task, layers))
    again = prune_and_finetune(task, policy, seed=5)
    assert again.metrics == first.metrics


def test_without_fine_tuning_gradual_is_one_shot(tiny_task: Task) -> None:
    task = dataclasses.replace(tiny_task, finetune_epochs=0)
    layers = prunable_layers(task.model)
    policy = Policy(dict.fromkeys(layers, 0.7))
    oneshot = prune_and_finetune(task, policy, seed=0)
    gradual = prune_and_finetune(task, dataclasses.replace(policy, schedule="gradual"), seed=0)
    assert gradual.metrics == oneshot.metrics


def _sizes(task: Task, layers: list[str]) -> list[int]:
    modules = dict(task.model.named_modules())
    return [modules[k].weight.numel() for k in layers]


def test_steps_per_epoch(tiny_task: Task) -> None:
    assert steps_per_epoch(tiny_task) == 6  # 192 samples in batches of 32
    assert steps_per_epoch(dataclasses.replace(tiny_task, batch_size=50)) == 4


def test_schedule_is_searched_only_when_there_is_a_choice() -> None:
    layers = ["a", "b"]
    one = SearchSpace(
        criteria=["magnitude"],
        scopes=["global"],
        rules=["ratio"],
        parametrization="per-layer",
        schedules=["oneshot"],
        lr_scale=(1.0, 1.0),  # the task's rate: no param of its own
    )
    trial = optuna.trial.FixedTrial(
        {"criterion": "magnitude", "scope": "global", "rule": "ratio", "sparsity": 0.5}
    )
    assert suggest_policy(trial, one, layers).schedule == "oneshot"
    two = dataclasses.replace(one, schedules=("oneshot", "gradual"))
    trial = optuna.trial.FixedTrial(
        {
            "criterion": "magnitude",
            "scope": "global",
            "rule": "ratio",
            "sparsity": 0.5,
            "schedule": "gradual",
        }
    )
    assert suggest_policy(trial, two, layers).schedule == "gradual"


def test_unknown_schedules_are_named() -> None:
    with pytest.raises(SpecError, match=r"^unknown schedule 'agp' \(known: oneshot, gradual, "):
        Policy({"a": 0.5}, schedule="agp")
    with pytest.raises(SpecError, match=r"^unknown schedule 'agp' \(known: oneshot, gradual, "):
        SearchSpace(schedules=["agp"])
    assert Policy.from_dict({"sparsity": {"a": 0.5}}).schedule == "oneshot"  # old policies
