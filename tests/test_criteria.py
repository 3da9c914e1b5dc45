"""Criteria: one contract every registered criterion passes, then each criterion's formula."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import autoprune
from autoprune import CRITERIA, Policy, SpecError, get_criterion, register_criterion
from autoprune.pruning.calibration import STATISTICS, LayerStats, calibrate, calibration_gradients
from autoprune.pruning.criteria import criteria_for
from autoprune.pruning.masks import compute_masks, prunable_layers, score


def _weight_and_grad(task: autoprune.Task, layer: str) -> tuple[torch.Tensor, LayerStats]:
    weight = dict(task.model.named_modules())[layer].weight.detach()
    return weight, calibrate(task.model, task, [layer], STATISTICS)[layer]


# Parametrized over the registry itself, so a newly registered criterion is checked too
# (channel criteria pass their own contract in test_structured.py).
@pytest.mark.parametrize("name", criteria_for("unstructured"))
def test_criterion_contract(name: str, tiny_task: autoprune.Task) -> None:
    criterion = get_criterion(name)
    assert criterion.name == name
    assert set(criterion.needs) <= set(STATISTICS)
    layers = prunable_layers(tiny_task.model)
    stats = calibrate(tiny_task.model, tiny_task, layers, criterion.needs)
    modules = dict(tiny_task.model.named_modules())
    scores = {}
    for layer in layers:
        weight = modules[layer].weight.detach()
        weight_before = weight.clone()
        given = stats[layer]
        stats_before = [None if t is None else t.clone() for t in dataclasses.astuple(given)]

        torch.manual_seed(123)
        first = criterion.score(weight, given)
        torch.manual_seed(123)
        second = criterion.score(weight, given)

        assert first.shape == weight.shape
        assert torch.isfinite(first).all()
        assert (first >= 0).all()
        assert torch.equal(first, second), "not deterministic under torch.manual_seed"
        assert torch.equal(weight, weight_before), "the criterion modified the weight"
        for after, before in zip(dataclasses.astuple(given), stats_before, strict=True):
            assert after is None or torch.equal(after, before), "it modified the statistics"
        scores[layer] = first

    sparsity = dict(zip(layers, (0.3, 0.75, 0.5), strict=True))
    masks = compute_masks(Policy(sparsity, criterion=name), scores)
    for layer in layers:
        n = scores[layer].numel()
        assert masks[layer].shape == scores[layer].shape
        assert int((~masks[layer]).sum()) == round(sparsity[layer] * n)


def test_magnitude_is_abs_weight(tiny_task: autoprune.Task) -> None:
    weight, stats = _weight_and_grad(tiny_task, "classifier.1")
    assert torch.equal(get_criterion("magnitude").score(weight, stats), weight.abs())


def test_taylor_is_abs_weight_times_grad(tiny_task: autoprune.Task) -> None:
    weight, stats = _weight_and_grad(tiny_task, "classifier.1")
    assert get_criterion("taylor").needs == ("grad",)
    scores = get_criterion("taylor").score(weight, stats)
    assert torch.equal(scores, (weight * stats.grad).abs())


def test_sensitivity_is_grad(tiny_task: autoprune.Task) -> None:
    weight, stats = _weight_and_grad(tiny_task, "features.0")
    assert get_criterion("sensitivity").needs == ("grad",)
    scores = get_criterion("sensitivity").score(weight, stats)
    assert torch.equal(scores, stats.grad)
    assert scores is not stats.grad  # a copy: changing the scores cannot change the gradients


def test_random_depends_on_seed_only(tiny_task: autoprune.Task) -> None:
    weight, stats = _weight_and_grad(tiny_task, "classifier.1")
    random = get_criterion("random")
    assert not random.needs
    torch.manual_seed(0)
    a = random.score(weight, stats)
    torch.manual_seed(1)
    b = random.score(weight, stats)
    torch.manual_seed(0)
    c = random.score(weight * 7.0, stats)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_calibration_gradients_is_mean_abs_grad_and_ignores_existing_grad(
    tiny_task: autoprune.Task,
) -> None:
    model = tiny_task.model
    layers = prunable_layers(model)
    modules = dict(model.named_modules())
    # Garbage in .grad, as user code might leave behind: it must be ignored and left as is.
    garbage = {}
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e3)
        garbage[id(p)] = p.grad.clone()
    params_before = copy.deepcopy(model.state_dict())

    grads = calibration_gradients(model, tiny_task, layers)

    # By hand: mean over the first `calibration_batches` shuffled (seed 0) training batches.
    x, y = tiny_task.train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    size, n_batches = tiny_task.batch_size, tiny_task.calibration_batches
    assert n_batches * size < len(x)  # so that the cut-off is exercised
    reference = copy.deepcopy(model)
    reference.eval()
    ref_modules = dict(reference.named_modules())
    expected = {name: torch.zeros_like(modules[name].weight) for name in layers}
    for b in range(n_batches):
        index = order[b * size : (b + 1) * size]
        reference.zero_grad(set_to_none=True)
        tiny_task.loss(reference(x[index]), y[index]).backward()
        for name in layers:
            expected[name] += ref_modules[name].weight.grad.abs()
    for name in layers:
        assert grads[name].shape == modules[name].weight.shape
        torch.testing.assert_close(grads[name], expected[name] / n_batches)

    for p in model.parameters():
        assert torch.equal(p.grad, garbage[id(p)]), ".grad was changed"
    for key, value in model.state_dict().items():
        assert torch.equal(value, params_before[key]), f"{key} was changed"


def test_calibration_gradients_restores_training_mode(tiny_task: autoprune.Task) -> None:
    tiny_task.model.train()
    calibration_gradients(tiny_task.model, tiny_task, ["features.0"])
    assert tiny_task.model.training
    tiny_task.model.eval()
    calibration_gradients(tiny_task.model, tiny_task, ["features.0"])
    assert not tiny_task.model.training


def test_get_criterion_unknown_names_it() -> None:
    with pytest.raises(SpecError, match=r"unknown criterion 'nope' \(known: .*magnitude"):
        get_criterion("nope")


def test_registering_a_duplicate_name_raises() -> None:
    original = CRITERIA["magnitude"]
    with pytest.raises(ValueError, match=r"^criterion 'magnitude' is already registered$"):
        register_criterion("magnitude")(lambda w, g: w)
    assert CRITERIA["magnitude"] is original


def test_score_without_grads_for_a_grad_criterion_raises(tiny_task: autoprune.Task) -> None:
    policy = Policy({"features.0": 0.5}, criterion="taylor")
    message = r"^criterion 'taylor' needs calibration statistics: no grad of features.0$"
    with pytest.raises(ValueError, match=message):
        score(tiny_task.model, policy)


@pytest.fixture
def position_criterion():
    """A user criterion scoring each weight by its flat position: the first ones go first."""
    name = "test-position"

    @register_criterion(name)
    def position(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return torch.arange(weight.numel(), dtype=weight.dtype).reshape(weight.shape)

    try:
        yield name
    finally:
        CRITERIA.unregister(name)


def test_user_criterion_works_end_to_end(
    position_criterion: str, tiny_task: autoprune.Task
) -> None:
    sparsity = {"features.0": 0.25, "classifier.1": 0.5}
    policy = Policy(sparsity, criterion=position_criterion)
    result = autoprune.prune_and_finetune(tiny_task, policy, seed=0)
    modules = dict(result.model.named_modules())
    for layer, s in sparsity.items():
        flat = modules[layer].weight.detach().flatten()
        k = round(s * flat.numel())
        assert torch.equal(flat[:k], torch.zeros(k))
        assert int(torch.count_nonzero(flat[k:])) == flat.numel() - k
    # A search space may offer it by name, like a built-in one.
    assert autoprune.SearchSpace(criteria=[position_criterion]).criteria == (position_criterion,)


def test_user_criterion_fixture_cleans_up() -> None:
    assert "test-position" not in CRITERIA
