"""One trial: policy → pruned copy → fine-tune → numbers, exact and replayable."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoprune
from autoprune import Policy, prune_and_finetune
from autoprune.pruning.calibration import STATISTICS, calibrate
from autoprune.pruning.criteria import criteria_for
from autoprune.pruning.masks import compute_masks, prunable_layers, score

LAYERS = ["features.0", "classifier.1", "classifier.3"]
SIZES = {"features.0": 36, "classifier.1": 1024, "classifier.3": 48}
SPARSITY = {"features.0": 0.3, "classifier.1": 0.8, "classifier.3": 0.45}


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach() for name in LAYERS}


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: w == 0 for name, w in _weights(model).items()}


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_task_model_is_not_modified(tiny_task: autoprune.Task) -> None:
    before = copy.deepcopy(tiny_task.model.state_dict())
    training = tiny_task.model.training
    result = prune_and_finetune(tiny_task, Policy(SPARSITY, criterion="taylor"), seed=0)
    after = tiny_task.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert tiny_task.model.training == training
    assert all(not m._forward_pre_hooks for m in tiny_task.model.modules())
    assert result.model is not tiny_task.model


@pytest.mark.parametrize(("scope", "rule"), [("layer", "ratio"), ("global", "ratio")])
def test_pruned_weights_are_exactly_zero_after_finetuning(
    tiny_task: autoprune.Task, scope: str, rule: str
) -> None:
    policy = Policy(SPARSITY, criterion="magnitude", scope=scope, rule=rule)
    masks = compute_masks(policy, score(tiny_task.model, policy))
    result = prune_and_finetune(tiny_task, policy, seed=0)
    weights = _weights(result.model)
    pruned = 0
    for name in LAYERS:
        w, keep = weights[name], masks[name]
        assert torch.equal(w[~keep], torch.zeros(int((~keep).sum())))
        assert int(torch.count_nonzero(w[keep])) == int(keep.sum())  # kept ones did not die
        pruned += int((~keep).sum())
    assert result.metrics["nonzero_params"] == sum(SIZES.values()) - pruned
    # The masks are folded in: plain parameters, no hooks, the original state_dict keys.
    assert set(result.model.state_dict()) == set(tiny_task.model.state_dict())
    assert all(not m._forward_pre_hooks for m in result.model.modules())
    # Fine-tuning did train the kept weights.
    dense = _weights(tiny_task.model)
    assert any(not torch.equal(weights[n][masks[n]], dense[n][masks[n]]) for n in LAYERS)


def test_achieved_sparsity_of_the_ratio_rule_is_the_target(tiny_task: autoprune.Task) -> None:
    result = prune_and_finetune(tiny_task, Policy(SPARSITY, criterion="random"), seed=3)
    assert list(result.layer_sparsity) == list(SPARSITY)
    for name, target in SPARSITY.items():
        n = SIZES[name]
        assert abs(result.layer_sparsity[name] * n - target * n) <= 1
        assert round(result.layer_sparsity[name] * n) == round(target * n)


def test_mean_rule_stays_within_the_caps(tiny_task: autoprune.Task) -> None:
    policy = Policy(SPARSITY, criterion="magnitude", rule="mean", alpha=3.0)
    result = prune_and_finetune(tiny_task, policy, seed=0)
    for name, cap in SPARSITY.items():
        assert result.layer_sparsity[name] * SIZES[name] <= round(cap * SIZES[name]) + 1e-9


def test_metrics_are_present_and_consistent(tiny_task: autoprune.Task) -> None:
    result = prune_and_finetune(tiny_task, Policy(SPARSITY), seed=0)
    metrics = result.metrics
    assert set(metrics) == {
        "accuracy",
        "val_loss",
        "nonzero_params",
        "total_params",
        "density",
        "sparsity",
        "test_accuracy",
    }
    nonzero = sum(int(torch.count_nonzero(w)) for w in _weights(result.model).values())
    assert metrics["total_params"] == sum(SIZES.values())
    assert metrics["nonzero_params"] == nonzero
    assert metrics["density"] == nonzero / metrics["total_params"]
    assert metrics["sparsity"] == 1.0 - metrics["density"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["accuracy"] == autoprune.train.evaluate(result.model, tiny_task, "val")[0]
    assert result.layer_sparsity == autoprune.pruning.masks.layer_sparsity(result.model, LAYERS)
    assert set(result.timings) == {"scoring", "masking", "finetuning", "evaluation"}
    assert all(t >= 0 for t in result.timings.values())
    assert len(result.history["val"]) == tiny_task.finetune_epochs + 1
    assert result.policy == Policy(SPARSITY)


def test_without_test_data_there_is_no_test_accuracy(tiny_task: autoprune.Task) -> None:
    import dataclasses

    task = dataclasses.replace(tiny_task, test=None)
    assert "test_accuracy" not in prune_and_finetune(task, Policy(SPARSITY), seed=0).metrics


@pytest.mark.parametrize("criterion", criteria_for("unstructured"))
def test_same_seed_replays_exactly(tiny_task: autoprune.Task, criterion: str) -> None:
    policy = Policy(SPARSITY, criterion=criterion, scope="global")
    first = prune_and_finetune(tiny_task, policy, seed=11)
    torch.manual_seed(999)  # the global RNG state before the call does not matter
    second = prune_and_finetune(tiny_task, policy, seed=11)
    assert first.metrics == second.metrics
    assert first.history == second.history
    assert first.layer_sparsity == second.layer_sparsity
    assert _same_state(first.model, second.model)


def test_equal_policies_listing_layers_in_another_order_replay_alike(
    tiny_task: autoprune.Task,
) -> None:
    policy = Policy(SPARSITY, criterion="random", scope="global")
    reordered = Policy.from_json(policy.to_json())  # JSON sorts the layer names
    assert reordered == policy and list(reordered.sparsity) != list(policy.sparsity)
    a = prune_and_finetune(tiny_task, policy, seed=2)
    b = prune_and_finetune(tiny_task, reordered, seed=2)
    assert a.metrics == b.metrics
    assert _same_state(a.model, b.model)


def test_different_seeds_draw_different_random_masks(tiny_task: autoprune.Task) -> None:
    policy = Policy(SPARSITY, criterion="random")
    a = _zero_masks(prune_and_finetune(tiny_task, policy, seed=0).model)
    b = _zero_masks(prune_and_finetune(tiny_task, policy, seed=1).model)
    for name in LAYERS:
        assert int(a[name].sum()) == int(b[name].sum()) == round(SPARSITY[name] * SIZES[name])
        assert not torch.equal(a[name], b[name])


@pytest.mark.parametrize("criterion", ["sensitivity", "wanda", "fisher"])
def test_given_stats_equal_computed_stats(criterion: str, tiny_task: autoprune.Task) -> None:
    # As a study gives them: measured once, every statistic, for more layers than the policy's.
    policy = Policy(SPARSITY, criterion=criterion)
    layers = prunable_layers(tiny_task.model)
    stats = calibrate(tiny_task.model, tiny_task, layers, STATISTICS)
    given = prune_and_finetune(tiny_task, policy, seed=0, stats=stats)
    computed = prune_and_finetune(tiny_task, policy, seed=0)
    assert given.metrics == computed.metrics
    assert _same_state(given.model, computed.model)


def test_zero_epochs_evaluates_the_pruned_model_as_is(tiny_task: autoprune.Task) -> None:
    import dataclasses

    task = dataclasses.replace(tiny_task, finetune_epochs=0)
    policy = Policy(SPARSITY)
    result = prune_and_finetune(task, policy, seed=0)
    masks = compute_masks(policy, score(task.model, policy))
    dense = _weights(task.model)
    for name, w in _weights(result.model).items():
        assert torch.equal(w, dense[name] * masks[name])
    assert result.history == {"train": [], "val": []}


def test_a_study_measures_the_statistics_of_its_space_once(
    tiny_task: autoprune.Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoprune.study import objective as objective_module

    calls: list[tuple[str, ...]] = []

    def counting(*args: object) -> object:
        calls.append(tuple(args[3]))  # type: ignore[arg-type]
        return calibrate(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(objective_module, "calibrate", counting)
    space = autoprune.SearchSpace(criteria=["magnitude", "taylor", "wanda"])
    objective = objective_module.Objective(tiny_task, space, LAYERS)
    assert objective._stats_for(Policy(SPARSITY)) is None  # magnitude needs none
    first = objective._stats_for(Policy(SPARSITY, criterion="wanda"))
    second = objective._stats_for(Policy(SPARSITY, criterion="taylor"))
    assert first is second
    assert calls == [("grad", "input_norm")]  # one pass, what the space's criteria need
    assert first is not None and first["features.0"].grad_sq is None
    # Only the criteria of the space's granularities count (taylor also scores channels).
    wanda_only = autoprune.SearchSpace(criteria=["magnitude", "wanda"])
    objective_module.Objective(tiny_task, wanda_only, LAYERS)._stats_for(
        Policy(SPARSITY, criterion="wanda")
    )
    assert calls[-1] == ("input_norm",)
