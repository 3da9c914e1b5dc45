"""pick / export / load: rules over Optuna's front, exports that reload to the same numbers."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from test_cli import run
from test_report import VALUES, hand_made_trial
from test_structured import build
from torch import nn

import autoprune
from autoprune import Policy, Task, search
from autoprune.deploy.directory import (
    FILES,
    default_task_ref,
    export,
    load,
    macs,
)
from autoprune.errors import SpecError, StorageError, TaskError
from autoprune.pruning.codec import load_state, save_state
from autoprune.pruning.structured import channel_groups, prune_structured
from autoprune.study.artifacts import ARTIFACT_ID_ATTR
from autoprune.study.pick import pick
from autoprune.study.setup import read_setup
from autoprune.study.space import SearchSpace
from autoprune.tasks import TASKS
from autoprune.train import evaluate

REF = "conftest:make_task"  # tests/ is on sys.path: this rebuilds the tiny task


@pytest.fixture
def hand_made() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["accuracy", "nonzero_params"])
    for i, (accuracy, nonzero) in enumerate(VALUES):
        study.add_trial(hand_made_trial(accuracy, nonzero, i))
    return study


def test_pick_rules(hand_made: optuna.Study) -> None:
    # Front: 5 and 6 (0.50, 10), 0 (0.90, 100), 1 (0.95, 200), 3 (0.99, 400).
    assert pick(hand_made, min_accuracy=0.95).number == 1
    assert pick(hand_made, min_accuracy=0.91).number == 1
    assert pick(hand_made, min_accuracy=0.0).number == 5  # equal values: the lower number
    assert pick(hand_made, max_params=399).number == 1
    assert pick(hand_made, max_params=400).number == 3
    assert pick(hand_made, max_size=100, by="nonzero_params").number == 0
    # Normalised (log10 size, accuracy): 0 at (0.63, 0.82) is farthest above the chord.
    assert pick(hand_made, knee=True).number == 0
    # The pick is the user's to change: a copy, not the storage's own trial.
    picked = pick(hand_made, knee=True)
    picked.user_attrs["note"] = "mine"
    assert "note" not in hand_made.get_trials(deepcopy=False)[0].user_attrs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_accuracy": 0.995}, "val accuracy >= 0.995 (the best has 0.9900)"),
        ({"max_params": 5}, "no front trial has nonzero_params <= 5 (the smallest has 10)"),
        ({}, "give exactly one of min_accuracy, max_params, max_size, max_bytes, knee, got 0"),
        ({"knee": True, "max_params": 5}, "got ['max_params', 'knee']"),
        ({"knee": True, "by": "bytes"}, "must be one of nonzero_params, got 'bytes'"),
        ({"max_bytes": 5}, "does not measure bytes (its size objectives: nonzero_params)"),
    ],
)
def test_pick_errors(hand_made: optuna.Study, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as error:
        pick(hand_made, **kwargs)
    assert message in str(error.value)


def test_knee_without_a_bend_is_the_nearest_to_ideal() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, (accuracy, size) in enumerate([(0.1, 10), (0.5, 100), (0.95, 1000)]):
        study.add_trial(hand_made_trial(accuracy, size, i))
    assert pick(study, knee=True).number == 1  # every point lies on or below the chord


@pytest.fixture(scope="module")
def searched(_trained_task: Task, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("export")
    storage = f"sqlite:///{directory / 'run.db'}"
    study = search(_trained_task, n_trials=5, storage=storage, study_name="s", seed=4)
    return {"dir": directory, "storage": storage, "study": study, "task": _trained_task}


@pytest.mark.slow
def test_export_and_load_reproduce_the_trial(searched: dict[str, Any], tmp_path: Path) -> None:
    study, task = searched["study"], searched["task"]
    trial = pick(study, knee=True)
    done = export(study, trial.number, tmp_path / "out", task=task, task_ref=REF)
    assert done.source == "artifact"
    assert sorted(p.name for p in done.directory.iterdir()) == sorted(FILES)
    metrics = json.loads((done.directory / "metrics.json").read_text())
    assert metrics["accuracy"] == trial.values[0]
    assert metrics["test_accuracy"] == trial.user_attrs["test_accuracy"]
    assert metrics["nonzero_params"] == trial.values[1]
    assert metrics["bytes"] == (done.directory / "model.pt").stat().st_size
    assert metrics["bytes"] < metrics["dense_bytes"]
    assert metrics["macs"] == macs(task.model, task.val[0][:1]) > 0
    assert json.loads((done.directory / "policy.json").read_text()) == trial.user_attrs["policy"]
    manifest = json.loads((done.directory / "export.json").read_text())
    assert manifest["task"] == REF and manifest["trial"] == trial.number
    # Rebuilt from the task reference alone (code: trusted), it gives the recorded accuracy.
    model = autoprune.load(done.directory, trust_task_code=True)
    assert evaluate(model, task, "test")[0] == metrics["test_accuracy"]
    assert not model.training
    state = load_state(done.directory / "model.pt")
    assert all(state[k].equal(v) for k, v in model.state_dict().items())
    other = Task(model=nn.Linear(3, 2), train=task.train, val=task.val)
    with pytest.raises(TaskError, match="model.pt' do not fit the model of the given task: key"):
        load(done.directory, task=other)


@pytest.mark.slow
def test_export_without_weights_replays(
    searched: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study, task = searched["study"], searched["task"]
    trial = pick(study, max_params=float("inf"))  # the most accurate front trial
    copy = tmp_path / "study.artifacts"
    shutil.copytree(searched["dir"] / "run.artifacts", copy)
    (copy / trial.user_attrs[ARTIFACT_ID_ATTR]).unlink()
    with caplog.at_level(logging.WARNING):
        done = export(study, trial.number, tmp_path / "out", task=task, artifact_dir=copy)
    assert done.source == "replay"
    assert f"trial {trial.number} has no stored weights: replaying it" in caplog.text
    assert done.metrics["accuracy"] == trial.values[0]
    model = load(done.directory, task=task)
    assert evaluate(model, task, "test")[0] == trial.user_attrs["test_accuracy"]


@pytest.mark.slow
def test_export_refuses_bad_input(searched: dict[str, Any], tmp_path: Path) -> None:
    study, task = searched["study"], searched["task"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SpecError, match="'.*full' exists and is not empty"):
        export(study, 0, tmp_path / "full", task=task)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    with pytest.raises(SpecError, match="study 's' has no trial 99"):
        export(study, 99, tmp_path / "x", task=task)
    for number in (-1, 2**63, 10**20):  # beyond a database integer: no trial, not a crash
        with pytest.raises(SpecError, match=f"has no trial {number}"):
            export(study, number, tmp_path / "x", task=task)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_pick_and_export(searched: dict[str, Any], tmp_path: Path, capsys) -> None:
    study, storage = searched["study"], searched["storage"]
    code, out, _ = run(capsys, "pick", "--knee", "--storage", storage)
    knee = pick(study, knee=True)
    assert code == 0 and out.startswith(f"trial {knee.number}: accuracy ")
    assert "weights stored" in out
    code, _, err = run(capsys, "pick", "--min-accuracy", "1.5", "--storage", storage)
    assert code == 2 and err.count("\n") == 1
    assert "autoprune: error: no front trial has val accuracy >= 1.5" in err
    out_dir = tmp_path / "model"
    argv = ["export", str(knee.number), "--out", str(out_dir), "--task", REF]
    code, out, _ = run(capsys, *argv, "--storage", storage)
    assert code == 0 and f"exported trial {knee.number} from its stored weights" in out
    assert (out_dir / "model.pt").exists()
    code, _, err = run(capsys, "export", "0", "--out", str(tmp_path / "m2"), "--storage", storage)
    assert code == 2 and err.startswith("autoprune: error: unknown task 'tiny'")
    assert not (tmp_path / "m2").exists()


@pytest.mark.slow
def test_the_setup_s_task_reference_is_the_default(
    searched: dict[str, Any], tmp_path: Path
) -> None:
    assert default_task_ref(searched["study"]) == "tiny"  # given as an object: its name
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    study = search(REF, n_trials=1, warm_start=None, storage=storage, study_name="r")
    assert read_setup(study).task_ref == REF == default_task_ref(study)


@pytest.mark.parametrize("granularity", ["structured", "unstructured"])
def test_exported_trial_reproduces_its_recorded_numbers(
    resnet_task: Task, tmp_path: Path, granularity: str
) -> None:
    blocks = ["stages.0.1", "stages.1.1"] if granularity == "structured" else []
    space = SearchSpace(granularities=[granularity], blocks=blocks)
    study = search(resnet_task, n_trials=2, space=space, seed=1, objectives=["accuracy", "bytes"])
    trial = study.best_trials[0]
    done = export(study, trial.number, tmp_path / "best", task=resnet_task)
    assert ("plan" in json.loads((done.directory / "export.json").read_text())) == (
        granularity == "structured"
    )
    # Loaded on the dense model alone (no task reference rebuilt): the recorded accuracy.
    loaded = load(done.directory, base=resnet_task.model)
    assert evaluate(loaded, resnet_task, "val")[0] == trial.values[0]
    # The bytes objective counted exactly what the export's model.pt holds.
    assert (done.directory / "model.pt").stat().st_size == trial.values[1]
    assert done.metrics["bytes"] == trial.values[1]


def write_export(directory: Path, model: nn.Module, plan: Any, example: torch.Tensor) -> None:
    """An export directory as :func:`export` lays it out, for a model pruned by hand."""
    directory.mkdir()
    save_state(model.state_dict(), directory / "model.pt")
    shape = [1, *example.shape[1:]]
    manifest = {"task": "unused", "seed": 0, "plan": plan.to_dict(), "input_shape": shape}
    (directory / "export.json").write_text(json.dumps(manifest))


def test_structured_export_reloads_as_its_smaller_architecture(tmp_path: Path) -> None:
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
    write_export(tmp_path / "out", pruned, plan, x)
    loaded = load(tmp_path / "out", base=model)
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in pruned.parameters()]
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
    assert sum(p.numel() for p in model.parameters()) > 2 * sum(
        p.numel() for p in loaded.parameters()
    )
    assert all(p.numel() > 0 for p in model.parameters())  # the base model is left as it was
    with pytest.raises(SpecError, match="give load\\(\\) a task or a base model, not both"):
        load(tmp_path / "out", task=Task(model, (x, x), (x, x)), base=model)
    with pytest.raises(TaskError, match="plan does not fit the model of the given base model: "):
        load(tmp_path / "out", base=nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    (tmp_path / "out" / "export.json").write_text('{"task": "unused", "seed": 0}')  # no plan
    with pytest.raises(TaskError, match="do not fit the model of the given base model: "):
        load(tmp_path / "out", base=model)


def test_loading_an_export_never_unpickles(tmp_path: Path) -> None:
    class Marker:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (Path.touch, (tmp_path / "unpickled",))

    out = tmp_path / "out"
    out.mkdir()
    (out / "export.json").write_text(json.dumps({"task": "unused", "seed": 0}))
    torch.save({"format": "autoprune-weights/2", "x": Marker()}, out / "model.pt")
    with pytest.raises(StorageError, match=r"cannot read weights '.*model.pt': "):
        load(out, base=nn.Linear(2, 2))
    assert not (tmp_path / "unpickled").exists()
    torch.save({"format": "something else"}, out / "model.pt")
    with pytest.raises(StorageError, match=r"model.pt' is not an autoprune weights file"):
        load(out, base=nn.Linear(2, 2))
    with pytest.raises(StorageError, match=r"'.*nowhere' is not an autoprune export"):
        load(tmp_path / "nowhere", base=nn.Linear(2, 2))


PAYLOAD = """
from pathlib import Path
Path(__file__).with_name("ran").touch()
def build():
    Path(__file__).with_name("called").touch()
"""

TOY = """
import torch
from autoprune import Task
def build():
    x = torch.zeros(4, 3)
    return Task(model=torch.nn.Linear(3, 2), train=(x, x), val=(x, x))
"""


def small_export(directory: Path, task: str, model: nn.Module | None = None) -> Path:
    """An export of ``model`` (a Linear(3, 2)) whose export.json names ``task``."""
    directory.mkdir()
    save_state((model or nn.Linear(3, 2)).state_dict(), directory / "model.pt")
    (directory / "export.json").write_text(json.dumps({"task": task, "seed": 0}))
    return directory


def test_loading_an_export_runs_no_code_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = small_export(tmp_path / "out", "exported_payload:build")
    (out / "exported_payload.py").write_text(PAYLOAD)
    monkeypatch.delitem(sys.modules, "exported_payload", raising=False)
    monkeypatch.chdir(out)  # even with the directory importable, nothing is imported
    monkeypatch.syspath_prepend(str(out))
    with pytest.raises(TaskError) as error:
        load(out)
    assert str(error.value) == (
        f"export {str(out)!r} names task code 'exported_payload:build': importing it runs that "
        "code; pass load(..., trust_task_code=True) if you trust the export, or give task= or "
        "base="
    )
    assert not (out / "ran").exists() and "exported_payload" not in sys.modules
    (out / "export.json").write_text(json.dumps({"task": "sys:exit", "seed": 0}))
    with pytest.raises(TaskError, match="names task code 'sys:exit'"):
        load(out)  # not SystemExit
    (out / "export.json").write_text(json.dumps({"task": "no-such-task", "seed": 0}))
    with pytest.raises(TaskError, match="unknown task 'no-such-task' \\(built-in: "):
        load(out)  # a name is no code: looked up among the built-ins only
    # Given the architecture, the reference is never looked at.
    assert isinstance(load(out, base=nn.Linear(3, 2)), nn.Linear)


def test_trusted_task_code_is_imported_from_sys_path_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = small_export(tmp_path / "out", "exported_payload:build")
    (out / "exported_payload.py").write_text(PAYLOAD)
    monkeypatch.delitem(sys.modules, "exported_payload", raising=False)
    with pytest.raises(TaskError, match="task 'exported_payload:build' does not import"):
        load(out, trust_task_code=True)  # the export directory is not put on sys.path
    assert not (out / "ran").exists() and str(out) not in sys.path
    code = tmp_path / "code"
    code.mkdir()
    (code / "trusted_toy_task.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "trusted_toy_task", raising=False)
    weights = nn.Linear(3, 2)
    out = small_export(tmp_path / "trusted", "trusted_toy_task:build", weights)
    loaded = load(out, trust_task_code=True)
    assert torch.equal(loaded.weight, weights.weight) and not loaded.training


def test_built_in_task_names_need_no_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeds = []

    def toy(*, seed: int = 0) -> Task:
        seeds.append(seed)
        x = torch.zeros(4, 3)
        return Task(model=nn.Linear(3, 2), train=(x, x), val=(x, x))

    monkeypatch.setitem(TASKS, "toy-built-in", toy)
    weights = nn.Linear(3, 2)
    out = small_export(tmp_path / "out", "toy-built-in", weights)
    assert torch.equal(load(out).weight, weights.weight) and seeds == [0]


HOSTILE_MANIFESTS = {
    "empty file": ("", "is not an autoprune export: Expecting value"),
    "not utf-8": (b"\xff\xfe", "is not an autoprune export: 'utf-8' codec"),
    "a list": ("[]", "holds a JSON list, not an object"),
    "deep nesting": ("[" * 100_000, "is not an autoprune export: "),
    "huge int digits": ('{"task": "x", "seed": ' + "9" * 5000 + "}", "not an autoprune export"),
    "no task": ('{"seed": 0}', "'task' must be a non-empty string, got None"),
    "task not a string": ('{"task": ["x"], "seed": 0}', "'task' must be a non-empty string"),
    "empty task": ('{"task": "", "seed": 0}', "'task' must be a non-empty string, got ''"),
    "relative import": ('{"task": "..x:f", "seed": 0}', "'task' must be a name or package.module"),
    "no module": ('{"task": ":f", "seed": 0}', "got ':f'"),
    "no function": ('{"task": "os:", "seed": 0}', "got 'os:'"),
    "long task": ('{"task": "' + "x" * 300 + '", "seed": 0}', "'task' must be a non-empty"),
    "no seed": ('{"task": "x"}', "'seed' must be an integer in [0, 4294967295], got None"),
    "NaN seed": ('{"task": "x", "seed": NaN}', "'seed' must be an integer in [0, 4294967295]"),
    "negative seed": ('{"task": "x", "seed": -1}', "got -1"),
    "huge seed": ('{"task": "x", "seed": 18446744073709551616}', "got 18446744073709551616"),
    "float seed": ('{"task": "x", "seed": 1.0}', "got 1.0"),
    "bool seed": ('{"task": "x", "seed": true}', "got True"),
    "format 2": ('{"format": 2, "task": "x", "seed": 0}', "'format' must be 1, got 2"),
    "plan a list": ('{"task": "x", "seed": 0, "plan": []}', "'plan' must be an object"),
    "plan extra key": (
        '{"task": "x", "seed": 0, "plan": {"channels": {}, "code": 1}}',
        "'plan' must be an object of channels and removed_blocks",
    ),
    "no channels": ('{"task": "x", "seed": 0, "plan": {}}', "'plan.channels' must be an object"),
    "negative channel": (
        '{"task": "x", "seed": 0, "plan": {"channels": {"a": [-1]}}}',
        "'plan.channels' of 'a' must be increasing integers >= 0: [-1]",
    ),
    "unsorted channels": (
        '{"task": "x", "seed": 0, "plan": {"channels": {"a": [2, 1]}}}',
        "of 'a' must be increasing integers >= 0: [2, 1]",
    ),
    "string channels": (
        '{"task": "x", "seed": 0, "plan": {"channels": {"a": "12"}}}',
        "of 'a' must be increasing integers >= 0: '12'",
    ),
    "blocks not a list": (
        '{"task": "x", "seed": 0, "plan": {"channels": {}, "removed_blocks": "a"}}',
        "'plan.removed_blocks' must be a list of names, got 'a'",
    ),
    "no input shape": (
        '{"task": "x", "seed": 0, "plan": {"channels": {}}}',
        "'input_shape' must be a list of 1 to 8 integers >= 1",
    ),
    "input of 2**40 elements": (
        '{"task": "x", "seed": 0, "plan": {"channels": {}}, "input_shape": [1, 1099511627776]}',
        "with at most 16777216 elements in all, got [1, 1099511627776]",
    ),
    "zero input dim": (
        '{"task": "x", "seed": 0, "plan": {"channels": {}}, "input_shape": [1, 0]}',
        "got [1, 0]",
    ),
    "string input dim": (
        '{"task": "x", "seed": 0, "plan": {"channels": {}}, "input_shape": ["1"]}',
        "got ['1']",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_MANIFESTS))
def test_hostile_manifests_are_one_line_storage_errors(tmp_path: Path, name: str) -> None:
    text, message = HOSTILE_MANIFESTS[name]
    out = small_export(tmp_path / "out", "x")
    data = text.encode() if isinstance(text, str) else text
    (out / "export.json").write_bytes(data)
    for kwargs in ({}, {"base": nn.Linear(3, 2)}, {"trust_task_code": True}):
        with pytest.raises(StorageError) as error:
            load(out, **kwargs)
        assert message in str(error.value) and "\n" not in str(error.value), kwargs
        assert str(out) in str(error.value)


def test_export_files_that_are_not_regular_files_are_refused(tmp_path: Path) -> None:
    out = small_export(tmp_path / "out", "x")
    (out / "export.json").unlink()
    (out / "export.json").symlink_to("/dev/zero")  # would be read forever
    with pytest.raises(StorageError, match="'.*out' is not an autoprune export: not a regular"):
        load(out, base=nn.Linear(3, 2))
    (out / "export.json").unlink()
    os.mkfifo(out / "export.json")  # would block forever
    with pytest.raises(StorageError, match="is not an autoprune export: not a regular file"):
        load(out, base=nn.Linear(3, 2))
    (out / "export.json").unlink()
    (out / "export.json").write_text(json.dumps({"task": "x", "seed": 0}))
    (out / "model.pt").unlink()
    (out / "model.pt").symlink_to("/dev/zero")
    with pytest.raises(StorageError, match="cannot read weights '.*model.pt': not a regular"):
        load(out, base=nn.Linear(3, 2))


def test_weights_that_do_not_fit_name_the_file_and_the_first_key(tmp_path: Path) -> None:
    out = small_export(tmp_path / "out", "x")
    weights = out / "model.pt"
    prefix = f"the weights in '{weights}' do not fit the model of the given base model"
    for base, key in [
        (nn.Linear(3, 4), "key 'weight' has shape [2, 3], the model's is [4, 3]"),
        (nn.Linear(3, 2, bias=False), "key 'bias' is not in the model"),
        (nn.Sequential(nn.Linear(3, 2)), "key '0.weight' is missing"),
    ]:
        with pytest.raises(TaskError) as error:
            load(out, base=base)
        assert str(error.value) == f"{prefix}: {key}"
    save_state({"weight": torch.ones(2, 3, dtype=torch.complex64), "bias": torch.ones(2)}, weights)
    with pytest.raises(TaskError) as error:
        load(out, base=nn.Linear(3, 2))
    assert (
        str(error.value)
        == f"{prefix}: key 'weight' holds torch.complex64, the model's is torch.float32"
    )
    save_state({"weight": torch.ones(2, 3, dtype=torch.float64), "bias": torch.ones(2)}, weights)
    assert math.isfinite(float(load(out, base=nn.Linear(3, 2)).weight.detach().sum()))


def test_a_plan_naming_what_the_model_lacks_is_a_task_error(tmp_path: Path) -> None:
    out = small_export(tmp_path / "out", "x")
    plan = {"channels": {}, "removed_blocks": ["__class__"]}
    manifest = {"task": "x", "seed": 0, "plan": plan, "input_shape": [1, 3]}
    (out / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(TaskError, match="removes block '__class__', which the model lacks"):
        load(out, base=nn.Sequential(nn.Linear(3, 2)))
    plan = {"channels": {"0": [10**30]}, "removed_blocks": []}
    (out / "export.json").write_text(json.dumps(manifest | {"plan": plan}))
    with pytest.raises(TaskError, match="removes channel 10{30} of layer '0', which has 2$"):
        load(out, base=nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)))
    plan = {"channels": {"1": [0]}, "removed_blocks": []}  # a ReLU: no channels
    (out / "export.json").write_text(json.dumps(manifest | {"plan": plan}))
    with pytest.raises(TaskError, match="the export's plan does not fit the model of the given"):
        load(out, base=nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)))
