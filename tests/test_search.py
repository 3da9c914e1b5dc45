"""The Python API: search, resume, replay (materialize), and early rejection of bad input."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import new_study
from optuna.trial import TrialState
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune import (
    SearchSpace,
    Task,
    devices,
    load_study,
    materialize,
    pareto_front,
    search,
)
from autoprune.errors import StorageError, TaskError
from autoprune.pruning.masks import count_nonzero, prunable_layers
from autoprune.study import objective as objective_module
from autoprune.study.setup import STUDY_ATTR, read_setup
from autoprune.train import evaluate

LAYERS = ["features.0", "classifier.1", "classifier.3"]
# The per-layer parametrization, one-shot: the space of the tests that enqueue its params.
# The task's own learning rate (lr_scale (1, 1)): the params are those the tests enqueue.
PER_LAYER = SearchSpace(parametrization="per-layer", schedules=["oneshot"], lr_scale=(1.0, 1.0))
TOTAL = 4 * 9 + 64 * 16 + 16 * 3  # prunable weights of the tiny CNN


def url(tmp_path: Path, name: str = "x.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def snapshot(study: optuna.Study) -> list[tuple[int, TrialState, Any, dict[str, Any]]]:
    return [(t.number, t.state, t.values, t.params) for t in study.trials]


def model_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, Tensor], training: bool) -> None:
    after = model.state_dict()
    assert list(after) == list(before)  # no weight_orig / weight_mask left behind
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert model.training is training
    for module in model.modules():
        assert not module._forward_pre_hooks


def assert_replays(task: Task, study: optuna.Study) -> None:
    """Every complete trial's model, rebuilt from storage, gives exactly its numbers."""
    layers = list(read_setup(study).layers)
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        model = materialize(task, trial)
        accuracy, nonzero = trial.values
        assert evaluate(model, task, "val")[0] == accuracy, trial.number
        assert count_nonzero(model, layers)[0] == nonzero, trial.number
        if task.test is not None:
            assert evaluate(model, task, "test")[0] == trial.user_attrs["test_accuracy"]
        # Masks are folded: plain weights with exact zeros, no pruning hooks.
        assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())


@pytest.mark.slow
def test_search_records_a_complete_study(tiny_task: Task, tmp_path: Path) -> None:
    study = search(tiny_task, n_trials=3, storage=url(tmp_path), study_name="s", seed=0)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.metric_names == ["accuracy", "nonzero_params"]
    assert study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    setup = read_setup(study)
    assert list(setup.layers) == LAYERS == prunable_layers(tiny_task.model)
    assert setup.space == SearchSpace()
    assert setup.seed == 0
    assert setup.task == "tiny"
    assert setup.dense == {
        "accuracy": evaluate(tiny_task.model, tiny_task, "val")[0],
        "test_accuracy": evaluate(tiny_task.model, tiny_task, "test")[0],
        "nonzero_params": float(TOTAL),
        "total_params": float(TOTAL),
    }
    for trial in study.trials:
        accuracy, nonzero = trial.values
        attrs = trial.user_attrs
        assert 0.0 <= accuracy <= 1.0
        assert nonzero == round(attrs["density"] * TOTAL)
        assert set(attrs["layer_sparsity"]) == set(LAYERS)
        assert attrs["policy"]["criterion"] == trial.params["criterion"]
        assert {"seed", "test_accuracy", "history", "timings"} <= set(attrs)
    # Everything is in the database, not only in the returned object.
    stored = optuna.load_study(study_name="s", storage=url(tmp_path))
    assert snapshot(stored) == snapshot(study)
    assert stored.user_attrs == study.user_attrs


@pytest.mark.slow
def test_search_resumes_by_name(tiny_task: Task, tmp_path: Path) -> None:
    first = snapshot(search(tiny_task, n_trials=2, storage=url(tmp_path), study_name="s"))
    study = search(tiny_task, n_trials=4, storage=url(tmp_path), study_name="s")  # in all
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert snapshot(study)[:2] == first
    # The resumed run draws new policies instead of replaying the first run's draws.
    assert study.trials[2].params != study.trials[0].params
    assert optuna.get_all_study_names(url(tmp_path)) == ["s"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"seed": 1}, "seed 0, not 1"),
        ({"space": SearchSpace(criteria=["magnitude"])}, "space"),
        ({"space": SearchSpace(exclude=["classifier.3"])}, "layers"),
    ],
)
def test_resume_with_another_setup_is_refused(
    tiny_task: Task, tmp_path: Path, change: dict[str, Any], key: str
) -> None:
    search(tiny_task, n_trials=1, storage=url(tmp_path), study_name="s", seed=0)
    with pytest.raises(StorageError, match=f"study 's' was created with {key}"):
        search(tiny_task, n_trials=1, storage=url(tmp_path), study_name="s", **change)
    assert len(optuna.load_study(study_name="s", storage=url(tmp_path)).trials) == 1


@pytest.mark.slow
def test_resume_with_another_task_is_refused(tiny_task: Task, tmp_path: Path) -> None:
    search(tiny_task, n_trials=1, storage=url(tmp_path), study_name="s")
    other = dataclasses.replace(tiny_task, name="other")
    with pytest.raises(StorageError, match="study 's' was created with task 'tiny', not 'other'"):
        search(other, n_trials=1, storage=url(tmp_path), study_name="s")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"finetune_epochs": 2}, "finetune"),
        ({"lr": 0.5}, "finetune"),
        ({"model": "retrained"}, r"dense model weights \(fingerprint\)"),
    ],
)
def test_resume_with_another_model_or_recipe_is_refused(
    tiny_task: Task, tmp_path: Path, change: dict[str, Any], key: str
) -> None:
    search(tiny_task, n_trials=1, storage=url(tmp_path), study_name="s")
    if change.get("model") == "retrained":
        model = copy.deepcopy(tiny_task.model)
        with torch.no_grad():
            model.classifier[3].bias[0] += 1e-3  # the same architecture, other weights
        change = {"model": model}
    with pytest.raises(StorageError, match=f"study 's' was created with {key}"):
        search(
            dataclasses.replace(tiny_task, **change),
            n_trials=1,
            storage=url(tmp_path),
            study_name="s",
        )
    assert len(optuna.load_study(study_name="s", storage=url(tmp_path)).trials) == 1


def test_materialize_warns_when_the_replay_differs(
    tiny_task: Task, caplog: pytest.LogCaptureFixture
) -> None:
    study = search(tiny_task, n_trials=1, seed=0)
    trial = study.trials[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        materialize(tiny_task, trial)
    assert [r for r in caplog.records if r.name.startswith("autoprune")] == []
    other = copy.deepcopy(tiny_task.model)
    with torch.no_grad():
        other.classifier[3].bias.copy_(torch.tensor([5.0, -5.0, -5.0]))  # a different model
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        materialize(dataclasses.replace(tiny_task, model=other), trial)
    assert f"trial {trial.number} replayed to val accuracy" in caplog.text
    assert "is this the task the study searched" in caplog.text


@pytest.mark.slow
def test_materialize_reproduces_every_criterion_exactly(tiny_task: Task, tmp_path: Path) -> None:
    before, training = model_state(tiny_task.model), tiny_task.model.training
    storage = url(tmp_path)
    kwargs: dict[str, Any] = {"space": PER_LAYER, "warm_start": None, "seed": 3}
    search(tiny_task, n_trials=1, storage=storage, study_name="s", **kwargs)
    # Warm-start the rest (Optuna's enqueue_trial) so that every criterion, scope and rule
    # is replayed, whatever the sampler draws.
    study = optuna.load_study(study_name="s", storage=storage)
    sparsities = {f"sparsity:{name}": s for name, s in zip(LAYERS, (0.5, 0.8, 0.3), strict=True)}
    for params in (
        {"criterion": "sensitivity", "scope": "layer", "rule": "ratio", **sparsities},
        {"criterion": "taylor", "scope": "global", "rule": "mean", "alpha": 1.0},
        {"criterion": "random", "scope": "global", "rule": "ratio", "sparsity": 0.6},
        {"criterion": "magnitude", "scope": "layer", "rule": "mean", "alpha": 0.5},
    ):
        study.enqueue_trial(params)
    study = search(tiny_task, n_trials=5, storage=storage, study_name="s", **kwargs)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert study.trials[1].params == {"criterion": "sensitivity", "scope": "layer"} | {
        "rule": "ratio",
        **sparsities,
    }
    assert_replays(tiny_task, study)
    assert_untouched(tiny_task.model, before, training)


def tensor_loaders(task: Task) -> dict[str, DataLoader]:
    def loader(split: str, shuffle: bool) -> DataLoader:
        return DataLoader(TensorDataset(*getattr(task, split)), batch_size=32, shuffle=shuffle)

    return {
        "train": loader("train", True),
        "val": loader("val", False),
        "test": loader("test", False),
    }


@pytest.mark.slow
def test_dataloader_data(tiny_task: Task, tmp_path: Path) -> None:
    task = dataclasses.replace(tiny_task, **tensor_loaders(tiny_task))
    before = model_state(task.model)
    storage = url(tmp_path)
    search(task, n_trials=1, storage=storage, study_name="s", space=PER_LAYER, warm_start=None)
    study = optuna.load_study(study_name="s", storage=storage)
    study.enqueue_trial(
        {"criterion": "taylor", "scope": "global", "rule": "ratio", "sparsity": 0.5}
    )
    study = search(task, n_trials=3, storage=storage, study_name="s", space=PER_LAYER)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    dense = read_setup(study).dense
    assert dense["accuracy"] == evaluate(tiny_task.model, tiny_task, "val")[0]
    assert_replays(task, study)
    assert_untouched(task.model, before, training=False)


def test_without_test_data(tiny_task: Task, tmp_path: Path) -> None:
    task = dataclasses.replace(tiny_task, test=None)
    study = search(task, n_trials=2, storage=url(tmp_path), study_name="s")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert "test_accuracy" not in read_setup(study).dense
    assert not any("test_accuracy" in t.user_attrs for t in study.trials)
    front = pareto_front(study)
    assert len(front) >= 1 and front["test_accuracy"].isna().all()
    assert_replays(task, study)


def test_in_memory_study(tiny_task: Task) -> None:
    study = search(tiny_task, n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert list(read_setup(study).layers) == LAYERS


def test_neither_trials_nor_timeout(tiny_task: Task, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give n_trials or timeout"):
        search(tiny_task, n_trials=None, storage=url(tmp_path), study_name="s")
    assert list(tmp_path.iterdir()) == []


class PoisonableLoss:
    """Cross-entropy, or NaN while ``poisoned`` is set."""

    def __init__(self) -> None:
        self.poisoned = False

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.poisoned else loss


def test_nan_loss_fails_only_that_trial(tiny_task: Task, tmp_path: Path) -> None:
    loss = PoisonableLoss()
    task = dataclasses.replace(tiny_task, loss=loss)

    def poison_trial_1(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        loss.poisoned = trial.number == 0  # poisoned for trial 1 only

    study = search(
        task,
        n_trials=3,
        storage=url(tmp_path),
        study_name="s",
        space=SearchSpace(criteria=["magnitude"]),
        callbacks=[poison_trial_1],
    )
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    failed = study.trials[1]
    assert failed.values is None
    assert "non-finite loss nan" in failed.user_attrs["fail_reason"]
    assert "policy" in failed.user_attrs  # what was tried is kept
    assert set(pareto_front(study)["trial"]) <= {0, 2}


class ExhaustibleOptimizer:
    """Adam, or the device running out of memory as the trial starts fine-tuning while
    ``exhausted`` is set (as a trial too large for its GPU does)."""

    def __init__(self, error: Exception) -> None:
        self.error, self.exhausted = error, False

    def __call__(self, params: Any, lr: float) -> torch.optim.Optimizer:
        if self.exhausted:
            raise self.error
        return torch.optim.Adam(params, lr=lr)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details"),
        RuntimeError("CUDA error: out of memory"),
    ],
    ids=["OutOfMemoryError", "RuntimeError"],
)
def test_out_of_memory_fails_only_that_trial_and_releases_memory(
    tiny_task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    released: list[torch.device] = []
    monkeypatch.setattr(devices, "release_memory", released.append)
    optimizer = ExhaustibleOptimizer(error)

    def exhaust_trial_1(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        optimizer.exhausted = trial.number == 0

    study = search(
        dataclasses.replace(tiny_task, optimizer=optimizer),
        n_trials=4,
        storage=url(tmp_path),
        study_name="s",
        space=SearchSpace(criteria=["magnitude"]),
        callbacks=[exhaust_trial_1],
    )
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 2
    first_line = str(error).splitlines()[0]
    assert study.trials[1].user_attrs["fail_reason"] == f"out of memory on cpu: {first_line}"
    assert "policy" in study.trials[1].user_attrs  # what was tried is kept
    assert released == [torch.device("cpu")]  # once, for the trial that ran out


def test_other_errors_are_not_taken_for_out_of_memory(tiny_task: Task) -> None:
    optimizer = ExhaustibleOptimizer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    optimizer.exhausted = True
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        search(dataclasses.replace(tiny_task, optimizer=optimizer), n_trials=1, warm_start=None)


def test_the_device_is_the_run_s_not_the_study_s(
    tiny_task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``device`` overrides the task's for this run's trials; a run on another device resumes
    the same study."""
    ran_on: list[str] = []
    real = objective_module.prune_and_finetune

    def recording(task: Task, *args: Any, **kwargs: Any) -> Any:
        ran_on.append(task.device)
        return real(task, *args, **kwargs)

    monkeypatch.setattr(objective_module, "prune_and_finetune", recording)
    search(tiny_task, n_trials=1, storage=url(tmp_path), study_name="s", device="cpu")
    search(tiny_task, n_trials=2, storage=url(tmp_path), study_name="s")  # resumed, on auto
    assert ran_on == ["cpu", "auto"]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "device must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"),
        ("cuda:99", "device 'cuda:99' asked for, but torch sees "),
    ],
)
def test_a_bad_or_absent_device_is_refused_before_the_storage(
    tiny_task: Task, tmp_path: Path, device: str, message: str
) -> None:
    with pytest.raises(TaskError) as info:
        search(tiny_task, n_trials=1, storage=url(tmp_path), study_name="s", device=device)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_diverging_finetuning_fails_every_trial_but_not_the_study(
    tiny_task: Task, tmp_path: Path
) -> None:
    def diverging(params, lr):  # a step far beyond any learning rate a Task takes
        return torch.optim.SGD(params, lr=1e30)

    task = dataclasses.replace(tiny_task, optimizer=diverging)
    space = SearchSpace(criteria=["magnitude"], sparsity=(0.0, 0.5))
    study = search(task, n_trials=2, storage=url(tmp_path), study_name="s", space=space)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    for trial in study.trials:
        assert "non-finite loss" in trial.user_attrs["fail_reason"]
    assert pareto_front(study).empty


@pytest.mark.parametrize(
    "storage",
    ["sqlite:///{tmp}/no/such/dir/x.db", "nosuchdialect://x"],
)
def test_unopenable_storage(
    tiny_task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: str
) -> None:
    monkeypatch.chdir(tmp_path)
    storage = storage.format(tmp=tmp_path)
    with pytest.raises(StorageError) as info:
        search(tiny_task, n_trials=1, storage=storage, study_name="s")
    message = str(info.value)
    assert message.startswith(f"cannot open storage {storage!r}: ") and "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_data_that_does_not_fit_is_refused_before_the_storage(
    tiny_task: Task, tmp_path: Path, split: str
) -> None:
    x, y = torch.rand(40, 1, 5, 5), torch.randint(0, 3, (40,))
    task = dataclasses.replace(tiny_task, **{split: (x, y)})
    with pytest.raises(TaskError) as info:
        search(task, n_trials=1, storage=url(tmp_path), study_name="s")
    message = str(info.value)
    assert message.startswith(f"{split} data of shape (32, 1, 5, 5) does not fit the model: ")
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_targets_that_do_not_fit_are_refused(tiny_task: Task, tmp_path: Path) -> None:
    x, _ = tiny_task.val
    task = dataclasses.replace(tiny_task, val=(x, torch.full((len(x),), 7)))  # 3 classes only
    with pytest.raises(TaskError, match=r"val data of shape \(32, 1, 8, 8\) does not fit"):
        search(task, n_trials=1, storage=url(tmp_path), study_name="s")
    assert list(tmp_path.iterdir()) == []


def test_model_without_prunable_layers(tiny_task: Task, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    task = dataclasses.replace(tiny_task, model=model)
    with pytest.raises(TaskError) as info:
        search(task, n_trials=1, storage=url(tmp_path), study_name="s")
    assert str(info.value) == "model Sequential has no prunable Linear or Conv layer"
    assert list(tmp_path.iterdir()) == []


def test_globs_matching_no_layer(tiny_task: Task, tmp_path: Path) -> None:
    space = SearchSpace(include=["features.*"], exclude=["features.0"])
    with pytest.raises(TaskError) as info:
        search(tiny_task, n_trials=1, storage=url(tmp_path), study_name="s", space=space)
    assert str(info.value) == (
        "include ['features.*'] / exclude ['features.0'] match no prunable layer "
        "(layers: features.0, classifier.1, classifier.3)"
    )
    assert list(tmp_path.iterdir()) == []


def test_materialize_refuses_foreign_trials(tiny_task: Task) -> None:
    plain = optuna.create_study(directions=["maximize", "minimize"])
    plain.add_trial(optuna.trial.create_trial(values=[0.5, 10.0]))
    trial = plain.trials[0]
    with pytest.raises(TaskError, match="trial 0 holds no autoprune policy"):
        materialize(tiny_task, trial)
    other = copy.deepcopy(tiny_task.model)
    del other.classifier[3]
    study = search(tiny_task, n_trials=1)
    with pytest.raises(TaskError, match="prunes layer 'classifier.3', which the task's model"):
        materialize(dataclasses.replace(tiny_task, model=other), study.trials[0])


@pytest.mark.slow
def test_load_study(tiny_task: Task, tmp_path: Path) -> None:
    storage = url(tmp_path)
    search(tiny_task, n_trials=1, storage=storage, study_name="s")
    assert load_study(storage, "s").trials[0].state == TrialState.COMPLETE
    assert load_study(storage, None).study_name == "s"  # the only study
    with pytest.raises(StorageError, match=f"no study named 'nope' in {storage!r}"):
        load_study(storage, "nope")
    optuna.create_study(storage=storage, study_name="plain")
    with pytest.raises(StorageError, match="study 'plain' was not made by autoprune"):
        load_study(storage, "plain")
    with pytest.raises(StorageError, match=r"give --study-name: .* holds 2 studies \(s, plain\)"):
        load_study(storage, None)
    before = (tmp_path / "x.db").read_bytes()
    assert read_setup(load_study(storage, "s")).seed == 0
    assert (tmp_path / "x.db").read_bytes() == before


def test_load_study_does_not_create_a_database(tmp_path: Path) -> None:
    storage = url(tmp_path, "missing.db")
    with pytest.raises(StorageError, match=f"storage {storage!r} does not exist"):
        load_study(storage, "s")
    with pytest.raises(StorageError, match="cannot open storage 'nosuchdialect://x': "):
        load_study("nosuchdialect://x", None)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_database_is_named_read_only(tiny_task: Task, tmp_path: Path) -> None:
    """Optuna says only that "an exception is raised during the commit"."""
    new_study(tiny_task, storage=url(tmp_path), study_name="s")
    read_only = f"sqlite:///file:{tmp_path / 'x.db'}?mode=ro&uri=true"  # root may write any file
    with pytest.raises(StorageError) as info:
        new_study(tiny_task, storage=read_only, study_name="t")
    message = str(info.value)
    assert message.startswith("cannot write to storage 'sqlite:///file") and "\n" not in message
    assert "x.db" in message and "it is read-only (" in message
    assert optuna.get_all_study_names(url(tmp_path)) == ["s"]


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ('{"op_code": 0, "worker_id": "w", "study_name": "b"}', "KeyError: 'directions'"),
        ('{"op_code": 0, "worker_id": "w", "study_name": "b", "directions": [7]}', "ValueError"),
        ('{"op_code": 99, "worker_id": "w"}', "AssertionError"),
        ("[1, 2]", "TypeError"),
    ],
)
def test_a_malformed_journal_record_is_named(
    tiny_task: Task, tmp_path: Path, record: str, error: str
) -> None:
    path = tmp_path / "j.log"
    new_study(tiny_task, storage=f"journal:{path}", study_name="s")
    with path.open("a", encoding="utf-8") as f:
        f.write(record + "\n")
    for attempt in (
        lambda: load_study(f"journal:{path}", "s"),
        lambda: new_study(tiny_task, storage=f"journal:{path}", study_name="s"),
    ):
        with pytest.raises(StorageError) as info:
            attempt()
        message = str(info.value)
        assert message.startswith(f"storage 'journal:{path}' holds a malformed record ({error}")
        assert "\n" not in message


# --- structured studies and per-study objectives (issue 4) ---------------------------------


@pytest.mark.slow
def test_structured_study_with_macs_and_latency(resnet_task: Task, tmp_path: Path) -> None:
    from autoprune.measure import Context, Latency, macs
    from autoprune.report.page import write_report

    space = SearchSpace(granularities=["structured"], blocks=["stages.*.1"], round_to=2)
    objectives = ["accuracy", "macs", "latency_ms"]
    latency = Latency(batch_size=8, repeats=3, warmup=1)
    kwargs: dict[str, Any] = {"space": space, "objectives": objectives, "latency": latency}
    study = search(resnet_task, n_trials=3, storage=url(tmp_path), study_name="s", **kwargs)
    assert study.metric_names == objectives
    assert study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    setup = read_setup(study)
    assert list(setup.objectives) == objectives and setup.latency == latency
    assert setup.blocks == ("stages.0.1", "stages.1.1")
    assert setup.groups[0] == "stem.0" and "fc" not in setup.groups
    assert setup.dense["macs"] >= max(t.values[1] for t in study.trials)
    assert setup.dense["macs"] > min(t.values[1] for t in study.trials)
    for trial in study.trials:
        policy = trial.user_attrs["policy"]
        assert policy["granularity"] == "structured" and policy["round_to"] == 2
        assert set(policy["sparsity"]) == set(setup.groups)
        assert "remove:stages.0.1" in trial.params
    front = pareto_front(study)
    assert {"macs", "latency_ms"} <= set(front.columns) and front["latency_ms"].gt(0).all()
    assert front["macs"].is_monotonic_increasing
    write_report(study, tmp_path / "r.html")
    assert "multiply-adds per input" in (tmp_path / "r.html").read_text()
    # A replay rebuilds the recorded model; another objective list is another study.
    context = Context(resnet_task.val[0][:1], setup.layers)
    for trial in study.trials:
        model = materialize(resnet_task, trial)
        assert evaluate(model, resnet_task, "val")[0] == trial.values[0]
        assert macs(model, context) == trial.values[1]
    with pytest.raises(StorageError, match=r"created with objectives"):
        search(resnet_task, n_trials=1, storage=url(tmp_path), study_name="s", space=space)


@pytest.mark.slow
def test_granularity_is_searched_within_one_study(resnet_task: Task) -> None:
    space = SearchSpace(granularities=["unstructured", "structured"])
    study = search(
        resnet_task,
        n_trials=6,
        space=space,
        objectives=["accuracy", "bytes"],
        sampler=optuna.samplers.RandomSampler(seed=3),
    )
    kinds = {t.params["granularity"] for t in study.trials}
    assert kinds == {"unstructured", "structured"}
    for trial in study.trials:
        policy = trial.user_attrs["policy"]
        assert policy.get("granularity", "unstructured") == trial.params["granularity"]


def test_unstructured_pruning_with_macs_is_refused_before_the_storage(
    resnet_task: Task, tmp_path: Path
) -> None:
    from autoprune.errors import SpecError

    with pytest.raises(SpecError, match=r"objective 'macs' is blind to unstructured zeros"):
        search(resnet_task, n_trials=1, storage=url(tmp_path), objectives=["accuracy", "macs"])
    assert not (tmp_path / "x.db").exists()


@pytest.mark.slow
def test_studies_of_autoprune_0_1_still_resume(tiny_task: Task, tmp_path: Path) -> None:
    """The untyped setup that autoprune 0.1 stored (no objectives in the first studies, the
    run's spec beside it) is read, and the resumed study stores the typed setup."""
    study = search(tiny_task, n_trials=1, storage=url(tmp_path), study_name="s")
    data = read_setup(study).to_dict()
    legacy = {k: data[k] for k in ("task", "finetune", "layers", "space", "seed", "model")}
    legacy |= {"version": "0.1.0", "dense": data["dense"]}
    legacy["spec"] = {"task": "tiny", "trials": 7, "sampler": "nsga2", "early_stop": {}}
    study.set_user_attr(STUDY_ATTR, legacy)
    old = read_setup(study)
    assert (old.task_ref, old.trials, old.sampler, old.early_stop) == ("tiny", 7, "nsga2", None)
    assert old.objectives == ("accuracy", "nonzero_params") and old.warm_start is None
    again = search(tiny_task, n_trials=2, storage=url(tmp_path), study_name="s")
    assert len(again.trials) == 2 and again.metric_names == ["accuracy", "nonzero_params"]
    assert again.user_attrs[STUDY_ATTR]["format"] == 2
    assert read_setup(again).trials == 2 and read_setup(again).sampler == "tpe"
