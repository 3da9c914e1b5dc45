"""Training loops: replayable fits, history shape, non-finite losses, evaluation over any data."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import make_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune import TrialFailed
from autoprune.train import evaluate, fit


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_is_deterministic_for_a_seed(tiny_task: autoprune.Task) -> None:
    a, b, c = (copy.deepcopy(tiny_task.model) for _ in range(3))
    history_a = fit(a, tiny_task, epochs=2, seed=5)
    history_b = fit(b, tiny_task, epochs=2, seed=5)
    history_c = fit(c, tiny_task, epochs=2, seed=6)
    assert history_a == history_b
    assert _states_equal(a, b)
    assert history_a["train"] != history_c["train"]  # the seed does decide the batch order
    assert not _states_equal(a, c)


def test_fit_history_shape(tiny_task: autoprune.Task) -> None:
    n_batches = -(-len(tiny_task.train[0]) // tiny_task.batch_size)
    assert n_batches >= 4
    history = fit(tiny_task.model, tiny_task, epochs=2, seed=0)
    assert set(history) == {"train", "val"}
    assert [epoch for epoch, _ in history["val"]] == [0.0, 1.0, 2.0]
    assert [epoch for epoch, _ in history["train"]] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert all(isinstance(loss, float) and loss >= 0 for _, loss in history["val"])
    assert all(isinstance(loss, float) and loss >= 0 for _, loss in history["train"])


def test_fit_val_curve_is_the_evaluated_loss(tiny_task: autoprune.Task) -> None:
    model = tiny_task.model
    before = evaluate(model, tiny_task, "val")[1]
    history = fit(model, tiny_task, epochs=1, seed=0)
    assert history["val"] == [[0.0, before], [1.0, evaluate(model, tiny_task, "val")[1]]]


def test_fit_with_zero_epochs_changes_nothing(tiny_task: autoprune.Task) -> None:
    model = copy.deepcopy(tiny_task.model)
    assert fit(model, tiny_task, epochs=0, seed=0) == {"train": [], "val": []}
    assert _states_equal(model, tiny_task.model)


def test_train_curve_averages_the_batch_losses() -> None:
    from autoprune.train import _curve

    assert _curve([1.0, 3.0, 5.0, 7.0, 9.0, 11.0], 2.0, 1.0) == [
        [2.25, 1.0],
        [2.5, 4.0],
        [2.75, 7.0],
        [3.0, 10.0],
    ]
    assert _curve([2.0, 4.0], 0.0, 1.0) == [[0.5, 2.0], [1.0, 4.0]]


class NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) * float("nan")


def test_non_finite_loss_raises_trial_failed(tiny_task: autoprune.Task) -> None:
    task = dataclasses.replace(tiny_task, model=NaNModel())
    with pytest.raises(TrialFailed, match=r"^non-finite loss nan at epoch 1, batch 0$"):
        fit(task.model, task, epochs=1, seed=0)


def test_infinite_loss_raises_trial_failed(tiny_task: autoprune.Task) -> None:
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets) + float("inf")

    task = dataclasses.replace(tiny_task, loss=loss)
    with pytest.raises(TrialFailed, match=r"^non-finite loss inf at epoch 1, batch 0$"):
        fit(task.model, task, epochs=1, seed=0)


def test_evaluate_over_a_dataloader_equals_over_tensors(tiny_task: autoprune.Task) -> None:
    x, y = make_data(50, 3)
    tensors = dataclasses.replace(tiny_task, val=(x, y), batch_size=7)
    loader = dataclasses.replace(
        tiny_task, val=DataLoader(TensorDataset(x, y), batch_size=13, shuffle=False)
    )
    metric_t, loss_t = evaluate(tiny_task.model, tensors, "val")
    metric_l, loss_l = evaluate(tiny_task.model, loader, "val")
    assert metric_t == metric_l
    assert loss_t == pytest.approx(loss_l, rel=1e-6)
    # And both equal one pass over the whole split at once.
    with torch.no_grad():
        logits = tiny_task.model(x)
    assert metric_t == autoprune.accuracy(logits, y)
    assert loss_t == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-6)


def test_evaluate_restores_training_mode_and_rejects_an_empty_split(
    tiny_task: autoprune.Task,
) -> None:
    tiny_task.model.train()
    evaluate(tiny_task.model, tiny_task, "val")
    assert tiny_task.model.training
    empty = dataclasses.replace(tiny_task, val=(torch.zeros(0, 1, 8, 8), torch.zeros(0).long()))
    with pytest.raises(ValueError, match=r"^split 'val' is empty$"):
        evaluate(empty.model, empty, "val")
