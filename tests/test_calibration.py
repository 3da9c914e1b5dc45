"""Calibration statistics: each one by hand, the model left as it was, the same on replay."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoprune
from autoprune import SpecError, get_criterion, register_criterion
from autoprune.pruning.calibration import STATISTICS, LayerStats, calibrate

LAYERS = ["0", "1", "3"]


def _task(calibration_batches: int = 3) -> autoprune.Task:
    """A conv, a grouped conv and a linear layer, on random data of 40 rows."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(40, 2, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g))
    return autoprune.Task(
        model=model,
        train=data,
        val=data,
        batch_size=8,
        calibration_batches=calibration_batches,
    )


def _calibration_rows(task: autoprune.Task) -> list[torch.Tensor]:
    """The calibration batches' indices, by hand: the first batches of the seed-0 shuffle."""
    x, _ = task.train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    size, n = task.batch_size, task.calibration_batches
    assert n * size < len(x)  # so that the cut-off is exercised
    return [order[b * size : (b + 1) * size] for b in range(n)]


def test_input_norm_is_the_norm_of_each_input_feature_by_hand() -> None:
    task = _task()
    stats = calibrate(task.model, task, LAYERS, ("input_norm",))
    rows = torch.cat(_calibration_rows(task))
    conv, grouped, _, linear = task.model
    with torch.no_grad():
        x0 = task.train[0][rows]
        x1 = conv(x0)
        x3 = grouped(x1).flatten(1)
    # Conv: input channel j over batch and spatial positions, broadcast over the kernel.
    norm0 = torch.stack([x0[:, j].norm() for j in range(2)])
    torch.testing.assert_close(stats["0"].input_norm, norm0.reshape(1, 2, 1, 1))
    # Grouped conv: output channel o sees the inputs of its group (2 groups of 2 channels).
    norm1 = torch.stack([x1[:, j].norm() for j in range(4)])
    expected1 = torch.stack([norm1[2 * (o // 2) : 2 * (o // 2) + 2] for o in range(4)])
    torch.testing.assert_close(stats["1"].input_norm, expected1.reshape(4, 2, 1, 1))
    # Linear: input feature j over all rows.
    torch.testing.assert_close(stats["3"].input_norm, x3.norm(dim=0).reshape(1, -1))
    assert stats["0"].grad is None and stats["0"].grad_sq is None  # only what was asked

    for name, module in zip(LAYERS, (conv, grouped, linear), strict=True):
        weight = module.weight.detach()
        expected = weight.abs() * stats[name].input_norm
        assert torch.equal(get_criterion("wanda").score(weight, stats[name]), expected)
        assert expected.shape == weight.shape


def test_grad_sq_is_the_mean_squared_batch_gradient_by_hand() -> None:
    task = _task()
    stats = calibrate(task.model, task, LAYERS, STATISTICS)
    reference = copy.deepcopy(task.model).eval()
    modules = dict(reference.named_modules())
    squares = {name: torch.zeros_like(modules[name].weight) for name in LAYERS}
    absolutes = {name: torch.zeros_like(modules[name].weight) for name in LAYERS}
    batches = _calibration_rows(task)
    x, y = task.train
    for index in batches:
        reference.zero_grad(set_to_none=True)
        task.loss(reference(x[index]), y[index]).backward()
        for name in LAYERS:
            squares[name] += modules[name].weight.grad.square()
            absolutes[name] += modules[name].weight.grad.abs()
    for name in LAYERS:
        torch.testing.assert_close(stats[name].grad_sq, squares[name] / len(batches))
        torch.testing.assert_close(stats[name].grad, absolutes[name] / len(batches))
        weight = modules[name].weight.detach()
        fisher = get_criterion("fisher").score(weight, stats[name])
        torch.testing.assert_close(fisher, weight.square() * squares[name] / len(batches))


def test_calibration_leaves_the_model_and_its_grad_as_they_were() -> None:
    task = _task()
    model = task.model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    state = copy.deepcopy(model.state_dict())
    calibrate(model, task, LAYERS, STATISTICS)
    assert model.training
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} was changed"
    assert all(not m._forward_hooks for m in model.modules()), "a hook was left behind"


def test_calibration_is_the_same_on_replay_and_whatever_else_is_measured() -> None:
    task = _task()
    first = calibrate(task.model, task, LAYERS, STATISTICS)
    again = calibrate(copy.deepcopy(task.model), task, LAYERS, STATISTICS)
    alone = {stat: calibrate(task.model, task, LAYERS[1:], (stat,)) for stat in STATISTICS}
    for name in LAYERS:
        for stat in STATISTICS:
            assert torch.equal(getattr(first[name], stat), getattr(again[name], stat))
            if name in LAYERS[1:]:
                assert torch.equal(getattr(first[name], stat), getattr(alone[stat][name], stat))


def test_a_transposed_layer_scores_its_input_columns() -> None:
    stats = LayerStats(grad=torch.ones(2, 3), input_norm=torch.tensor([[1.0, 2.0, 3.0]]))
    weight = torch.tensor([[1.0, -1.0, 2.0], [0.0, 1.0, 1.0]])
    columns = get_criterion("wanda").channel_score(weight.T, stats.transposed())  # type: ignore[misc]
    assert torch.equal(columns, torch.tensor([1.0, 4.0, 9.0]))


def test_unknown_statistics_are_named() -> None:
    with pytest.raises(SpecError, match=r"^unknown statistic 'hessian' \(known: grad, grad_sq"):
        register_criterion("test-hessian", needs=("hessian",))
    with pytest.raises(SpecError, match=r"^needs must be a list of statistics, got 'grad'$"):
        register_criterion("test-hessian", needs="grad")
    task = _task()
    with pytest.raises(SpecError, match=r"^unknown statistic 'nope'"):
        calibrate(task.model, task, LAYERS, ("nope",))
