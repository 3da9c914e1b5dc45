"""Export and reload: the smaller architecture rebuilt from plain data, nothing unpickled."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_structured import build
from torch import nn

import autoprune
from autoprune import Policy, TaskError, search
from autoprune.deploy.model_file import (
    export_model,
    export_trial,
    load_model,
    pack_state,
    unpack_state,
)
from autoprune.pruning.structured import channel_groups, prune_structured
from autoprune.study.space import SearchSpace
from autoprune.train import evaluate


def test_pack_state_round_trips_and_stores_zeros_compactly() -> None:
    model, _ = build("digits-mlp")
    with torch.no_grad():
        model[0].weight[torch.rand(model[0].weight.shape) < 0.9] = 0.0
    packed = pack_state(model)
    assert "0.weight::mask" in packed and "0.weight" not in packed
    assert "2.weight" in packed  # dense tensors stay as they are
    state = unpack_state(packed)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_structured_model_reloads_as_its_smaller_architecture(tmp_path: Path) -> None:
    model, x = build("tiny-resnet")
    groups = channel_groups(model, x[:2])
    policy = Policy(
        {g.name: 0.5 for g in groups},
        criterion="fpgm",
        granularity="structured",
        removed_blocks=("stages.1.1",),
    )
    pruned = copy.deepcopy(model)
    plan = prune_structured(pruned, policy, x[:2], groups=groups)
    path = export_model(pruned, tmp_path / "m.pt", policy=policy, example=x, plan=plan)
    loaded = load_model(path, model)
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in pruned.parameters()]
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
    assert sum(p.numel() for p in model.parameters()) > 2 * sum(
        p.numel() for p in loaded.parameters()
    )


def test_loading_never_unpickles(tmp_path: Path) -> None:
    class Marker:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (Path.touch, (tmp_path / "unpickled",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "autoprune-export/1", "x": Marker()}, path)
    with pytest.raises(TaskError, match=r"cannot read exported model"):
        load_model(path, nn.Linear(2, 2))
    assert not (tmp_path / "unpickled").exists()
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(TaskError, match=r"is not an autoprune export"):
        load_model(tmp_path / "other.pt", nn.Linear(2, 2))


@pytest.mark.parametrize("granularity", ["structured", "unstructured"])
def test_exported_trial_reproduces_its_recorded_accuracy(
    resnet_task: autoprune.Task,
    tmp_path: Path,
    granularity: str,
) -> None:
    blocks = ["stages.0.1", "stages.1.1"] if granularity == "structured" else []
    space = SearchSpace(granularities=[granularity], blocks=blocks)
    study = search(resnet_task, n_trials=2, space=space, seed=1, objectives=["accuracy", "bytes"])
    trial = study.best_trials[0]
    path = export_trial(resnet_task, trial, tmp_path / "best.pt")
    loaded = load_model(path, resnet_task.model)
    assert evaluate(loaded, resnet_task, "val")[0] == trial.values[0]
    assert path.stat().st_size < trial.values[1] + 2048  # bytes: the state, plus small metadata
