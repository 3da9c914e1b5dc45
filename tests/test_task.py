"""The Task contract: any batch, its hooks, devices and precisions, budgets and limits.

Every test runs on the CPU; CUDA is exercised through what must hold without one (no silent
fallback, batches moved structurally).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
from typing import Any

import pytest
import torch
from conftest import TinyCNN, make_data
from torch import Tensor, nn

import autoprune
from autoprune import devices
from autoprune.deploy import example
from autoprune.errors import TaskError
from autoprune.pruning.calibration import calibration_gradients
from autoprune.train import evaluate, fit, total_steps

Output = collections.namedtuple("Output", ["loss", "logits"])


class KeywordModel(nn.Module):
    """A Hugging Face-like classifier: keyword inputs, an output object with ``logits`` and,
    when given ``labels``, its own ``loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyCNN()
        self.own_losses = 0

    def forward(self, pixels: Tensor, labels: Tensor | None = None) -> Output:
        logits = self.body(pixels)
        loss = None
        if labels is not None:
            self.own_losses += 1
            loss = nn.functional.cross_entropy(logits, labels)
        return Output(loss, logits)


def dict_task(**overrides: Any) -> autoprune.Task:
    torch.manual_seed(0)
    (x, y), (vx, vy) = make_data(96, 0), make_data(64, 1)
    settings: dict[str, Any] = {
        "model": KeywordModel(),
        "train": {"pixels": x, "labels": y},
        "val": {"pixels": vx, "labels": vy},
        "finetune_epochs": 1,
        "lr": 1e-2,
        "batch_size": 16,
        "device": "cpu",
    }
    return autoprune.Task(**(settings | overrides))


def test_dict_data_is_sliced_into_dict_batches_and_shuffled_by_seed() -> None:
    task = dict_task()
    batches = list(task.batches("train"))
    assert len(batches) == task.batches_per_epoch() == 6
    assert all(set(b) == {"pixels", "labels"} and len(b["labels"]) == 16 for b in batches)
    one = [b["labels"] for b in task.batches("train", shuffle=True, seed=3)]
    again = [b["labels"] for b in task.batches("train", shuffle=True, seed=3)]
    other = [b["labels"] for b in task.batches("train", shuffle=True, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(one, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(one, other, strict=True))


def test_dict_batches_train_through_the_model_s_own_loss() -> None:
    task = dict_task()
    model = task.model
    before = evaluate(model, task, "val")
    history = fit(model, task, epochs=3, seed=0)
    after = evaluate(model, task, "val")
    assert model.own_losses >= 18  # the default batch_loss took outputs.loss, every step
    assert after[1] < before[1] and after[0] > before[0]
    assert history["val"][-1] == [3.0, after[1]]


def test_nested_batches_with_a_forward_hook() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return self.a(a) + self.b(b)

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, 4, generator=g), torch.rand(40, 2, generator=g)
    y = (a[:, 0] > 0.5).long() + (b[:, 0] > 0.5).long()
    batches = [((a[i : i + 8], {"b": b[i : i + 8]}), y[i : i + 8]) for i in range(0, 40, 8)]
    calls = []

    def forward(model: nn.Module, batch: Any) -> Tensor:
        (first, rest), _ = batch
        calls.append(first.shape[0])
        return model(first, rest["b"])

    task = autoprune.Task(
        model=TwoInputs(), train=batches, val=batches, forward=forward, device="cpu"
    )
    score, loss = evaluate(task.model, task, "val")
    assert calls == [8] * 5 and 0 <= score <= 1 and math.isfinite(loss)
    grads = calibration_gradients(task.model, task, ["a", "b"])
    assert grads["a"].shape == (3, 4) and grads["b"].abs().sum() > 0
    fit(task.model, task, epochs=1, seed=0)
    assert len(calls) == 5 + 4 + 5 + 5 + 5  # eval, calibration, eval at 0, 5 steps, eval


def test_batch_loss_hook_replaces_the_default() -> None:
    seen = []

    def batch_loss(outputs: Output, batch: dict[str, Tensor]) -> Tensor:
        seen.append(len(batch["labels"]))
        return nn.functional.cross_entropy(outputs.logits, batch["labels"], label_smoothing=0.1)

    task = dict_task(batch_loss=batch_loss)
    fit(task.model, task, epochs=1, seed=0)
    assert seen[:6] == [16] * 6  # val at 0 (4 batches), then training steps
    assert len(seen) == 4 + 6 + 4


def test_per_batch_metric_is_averaged_by_sample_count() -> None:
    x, y = make_data(50, 1)  # batches of 16, 16, 16 and 2: a plain mean of batches would differ
    task = dataclasses.replace(dict_task(), val=(x, y), batch_size=16)
    model = task.model.body
    task = dataclasses.replace(task, model=model)
    logits = model.eval()(x)
    expected = (logits.argmax(1) == y).float().mean().item()
    assert evaluate(model, task, "val")[0] == pytest.approx(expected, abs=1e-7)
    assert evaluate(model, task, "val")[1] == pytest.approx(
        nn.functional.cross_entropy(logits, y).item(), rel=1e-5
    )


def test_whole_split_metric_lower_is_better_searches_downwards(tmp_path: Any) -> None:
    def error_rate(model: nn.Module, batches: Any) -> float:
        wrong = total = 0
        for x, y in batches:
            wrong += int((model(x).argmax(1) != y).sum())
            total += len(y)
        return wrong / total

    torch.manual_seed(0)
    model = TinyCNN()
    task = autoprune.Task(
        model=model,
        train=make_data(96, 0),
        val=make_data(48, 1),
        evaluate=error_rate,
        higher_is_better=False,
        finetune_epochs=1,
        lr=1e-2,
        device="cpu",
    )
    fit(model, task, epochs=4, seed=0)
    score, _ = evaluate(model, task, "val")
    assert score == error_rate(model.eval(), task.batches("val"))
    study = autoprune.search(task, n_trials=3, warm_start=None, seed=0)
    assert study.directions[0] == optuna_minimize()
    assert all(0 <= t.values[0] <= 1 for t in study.trials)
    front = study.best_trials
    assert min(t.values[0] for t in front) == min(t.values[0] for t in study.trials)
    chosen = autoprune.pick(study, min_accuracy=1.0)  # error <= 1: every front trial
    assert chosen.values[1] == min(t.values[1] for t in front)  # so the smallest of them
    best = min(t.values[0] for t in front)
    assert autoprune.pick(study, min_accuracy=best).values[0] == best  # error <= best: it
    assert autoprune.pick(study, max_params=math.inf).values[0] == best  # the most accurate


def optuna_minimize() -> Any:
    import optuna

    return optuna.study.StudyDirection.MINIMIZE


def test_finetune_steps_cycle_the_data_and_count_optimizer_steps() -> None:
    steps = []
    task = dict_task(finetune_steps=14, grad_accumulation=2)  # 6 batches: 3 steps a pass
    assert total_steps(task) == 14
    history = fit(task.model, task, seed=0, on_step=lambda done, _m: steps.append(done))
    assert steps == list(range(14))
    assert history["val"][-1][0] == pytest.approx(14 / 3)
    assert len(history["val"]) == 1 + 5  # before, after 4 full passes and at the budget's end


def test_grad_accumulation_sums_batches_into_one_step() -> None:
    def sgd(params: Any, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr)

    model = dict_task().model
    whole = dict_task(model=copy.deepcopy(model), batch_size=96, optimizer=sgd)
    split = dict_task(
        model=copy.deepcopy(model), batch_size=24, grad_accumulation=4, optimizer=sgd
    )
    assert total_steps(whole) == total_steps(split) == 1
    fit(whole.model, whole, seed=0)
    fit(split.model, split, seed=0)  # the same 96 samples, in four batches, one step
    for a, b in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(next(whole.model.parameters()), next(model.parameters()))


def test_scheduler_is_stepped_once_per_optimizer_step() -> None:
    made = []

    def scheduler(optimizer: torch.optim.Optimizer, total: int) -> Any:
        made.append(total)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)

    task = dict_task(scheduler=scheduler, finetune_epochs=2)
    seen_lr = []
    original = task.optimizer

    def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        opt = original(params, lr)
        seen_lr.append(opt)
        return opt

    task = dataclasses.replace(task, optimizer=optimizer)
    fit(task.model, task, seed=0)
    assert made == [12]
    assert seen_lr[0].param_groups[0]["lr"] == pytest.approx(0.0)  # decayed to the end


def test_val_batches_bound_each_evaluation() -> None:
    task = dict_task(val_batches=2)
    counted = []
    task.model.body.register_forward_hook(lambda _m, args, _o: counted.append(len(args[0])))
    evaluate(task.model, task, "val")
    assert counted == [16, 16]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train_on_the_cpu(precision: str) -> None:
    task = dict_task(precision=precision)
    dtypes = []
    task.model.body.classifier[1].register_forward_hook(
        lambda _m, _a, out: dtypes.append(out.dtype)
    )
    history = fit(task.model, task, seed=0)
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert set(dtypes) == {expected}
    assert all(math.isfinite(loss) for _, loss in history["train"])
    assert all(p.dtype == torch.float32 for p in task.model.parameters())  # master weights


def test_a_trial_runs_on_the_task_device_and_reports_fp32_scores() -> None:
    task = dict_task(precision="bf16")
    result = autoprune.prune_and_finetune(
        task, autoprune.Policy(dict.fromkeys(["body.classifier.1"], 0.5)), seed=0
    )
    assert result.metrics["density"] == pytest.approx(0.5)
    assert next(result.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("device", "gpu", "device must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"),
        ("device", "cuda:x", "device must be one of"),
        ("precision", "fp8", "precision must be one of fp32, bf16, fp16, got 'fp8'"),
        ("finetune_steps", 0, "Task.finetune_steps must be an integer >= 1, got 0"),
        ("grad_accumulation", True, "Task.grad_accumulation must be an integer >= 1"),
        ("val_batches", -1, "Task.val_batches must be an integer >= 1, got -1"),
        ("lr", math.nan, "Task.lr must be a number > 0 and <= 1000, got nan"),
        ("lr", 1e300, "Task.lr must be a number > 0 and <= 1000, got 1e+300"),
        ("forward", "model", "Task.forward must be callable, got 'model'"),
        ("evaluate", 3, "Task.evaluate must be callable or None, got 3"),
        ("higher_is_better", 1, "Task.higher_is_better must be a bool, got 1"),
        ("train", iter([]), "Task.train is an iterator"),
        ("train", {"x": torch.zeros(3, 2), "y": torch.zeros(2)}, "same number of rows"),
        ("val", "data.csv", "Task.val must be an (inputs, targets) tensor pair"),
    ],
)
def test_bad_task_settings_name_the_value(field: str, value: Any, message: str) -> None:
    with pytest.raises(TaskError, match=re_escape(message)):
        dict_task(**{field: value})


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_no_silent_cpu_fallback_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    task = dict_task(device="cuda:0")
    with pytest.raises(TaskError, match="device 'cuda:0' asked for, but torch sees no CUDA"):
        autoprune.prune_and_finetune(task, autoprune.Policy({"body.classifier.1": 0.5}), seed=0)
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_to_device_keeps_the_batch_structure() -> None:
    Pair = collections.namedtuple("Pair", ["x", "y"])
    batch = {"a": [torch.ones(2), (torch.zeros(2, 3), "text")], "b": Pair(torch.ones(1), 3)}
    moved = devices.to_device(batch, torch.device("cpu"))
    assert isinstance(moved["b"], Pair) and moved["b"].y == 3 and moved["a"][1][1] == "text"
    assert isinstance(moved["a"], list) and isinstance(moved["a"][1], tuple)
    assert devices.batch_size(batch) == 2
    half = devices.slice_batch({"x": torch.arange(6).view(3, 2), "n": torch.tensor(5)}, 1)
    assert half["x"].tolist() == [[0, 1]] and half["n"].item() == 5


def test_out_of_memory_errors_are_recognised() -> None:
    assert devices.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert devices.is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))


def test_example_descriptions_round_trip_and_are_bounded() -> None:
    batch = {"ids": torch.ones(1, 5, dtype=torch.int64), "pair": (torch.rand(1, 2), None)}
    description = example.describe(batch)
    rebuilt = example.build(description)
    assert rebuilt["ids"].dtype == torch.int64 and rebuilt["ids"].shape == (1, 5)
    assert rebuilt["pair"][0].shape == (1, 2) and rebuilt["pair"][1] is None
    for bad, message in [
        ({"shape": [1, 2**40], "dtype": "float32"}, "more than"),
        ({"shape": [1], "dtype": "object"}, "dtype must be one of"),
        ({"items": [{"items": [{"items": [{"items": [{"items": [{"items": []}]}]}]}]}]}, "deeper"),
        ({"shape": "1", "dtype": "float32"}, "shapes must be lists"),
        ({"code": "import os"}, "keys ['code']"),
    ]:
        with pytest.raises(ValueError, match=re_escape(message)):
            example.build(bad)


def test_check_names_the_split_and_the_batch_structure() -> None:
    task = dict_task()
    bad = dataclasses.replace(
        task, val={"pixels": torch.rand(8, 1, 5, 5), "labels": torch.zeros(8)}
    )
    with pytest.raises(TaskError, match=r"val data \(\{'pixels': shape \(8, 1, 5, 5\)"):
        bad.check()


def test_cuda_devices_resolve_by_what_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert devices.resolve_device("auto") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TaskError, match=r"device 'cuda:2' asked for, but torch sees 2 GPU\(s\)"):
        devices.resolve_device("cuda:2")


def test_pinned_batches_are_copied_without_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_to(self: Tensor, device: Any, non_blocking: bool = False) -> Tensor:
        calls.append((str(device), non_blocking))
        return self

    monkeypatch.setattr(Tensor, "to", fake_to)
    monkeypatch.setattr(Tensor, "is_pinned", lambda self: self.shape[0] == 2)
    devices.to_device({"a": torch.ones(2), "b": torch.ones(3)}, torch.device("cuda", 0))
    assert calls == [("cuda:0", True), ("cuda:0", False)]
