"""The typed study setup: one way to make it, stored and read back whole, and the check that
a resumed run or a joining worker brings the same."""

from __future__ import annotations

import dataclasses
import inspect
import json

import optuna
import pytest
from conftest import new_study

from autoprune import (
    SearchSpace,
    SpecError,
    StorageError,
    Task,
    TaskError,
    __version__,
    make_setup,
    search,
)
from autoprune.measure import Latency
from autoprune.spec import StudySpec
from autoprune.study.constraints import Constraints
from autoprune.study.setup import (
    IDENTITY,
    STUDY_ATTR,
    StudySetup,
    check_same,
    read_setup,
    setup_if_any,
)
from autoprune.study.stopping import EarlyStop

# search()'s arguments that are make_setup()'s under another name, and those of the run only.
RENAMED = {"n_trials": "trials"}
RUN_ONLY = {
    "task",
    "timeout",
    "storage",
    "study_name",
    "callbacks",
    "device",
    "create_in_existing",
}


def test_make_setup_s_defaults_are_search_s() -> None:
    made = inspect.signature(make_setup).parameters
    searched = inspect.signature(search).parameters
    settings = {RENAMED.get(name, name): p.default for name, p in searched.items()}
    settings = {k: v for k, v in settings.items() if k not in RUN_ONLY}
    assert set(settings) == set(made) - {"task", "task_ref"}
    for name, default in settings.items():
        assert made[name].default == default, name


def test_python_defaults_are_the_spec_s(tiny_task: Task) -> None:
    """A Python user gets the spec's search: space, schedules, warm starts, sampler, budget,
    constraints, early stop, objectives."""
    from_python = make_setup(tiny_task)
    from_spec = StudySpec().setup(tiny_task)
    assert dataclasses.replace(from_spec, task_ref=None) == from_python
    assert from_python.space.parametrization == "allocation"
    assert from_python.space.schedules == ("oneshot", "gradual")
    assert from_python.warm_start is not None and from_python.warm_start.allocations
    assert (from_python.sampler, from_python.trials) == ("tpe", 40)
    assert from_python.constraints is None and from_python.early_stop is None
    assert from_python.finetune.precision == "fp32" and StudySpec().finetune.precision is None
    assert StudySpec().device is None and "device" not in from_python.to_dict()


@pytest.mark.parametrize("structured", [False, True])
def test_setup_round_trips_through_json(
    tiny_task: Task, resnet_task: Task, structured: bool
) -> None:
    if structured:
        space = SearchSpace(granularities=["structured"], blocks=["stages.*.1"])
        setup = make_setup(
            resnet_task,
            space=space,
            objectives=["accuracy", "macs", "latency_ms"],
            latency=Latency(batch_size=8),
            constraints=Constraints(min_accuracy=0.5),
            early_stop=EarlyStop(margin=0.2),
            task_ref="pkg.mod:build",
        )
        assert setup.groups and setup.blocks and setup.latency == Latency(batch_size=8)
    else:
        setup = dataclasses.replace(make_setup(tiny_task), dense={"accuracy": 0.9})
        assert setup.groups == () and setup.latency is None
    data = json.loads(json.dumps(setup.to_dict()))
    assert StudySetup.from_dict(data) == setup
    assert StudySetup.from_dict(data).to_dict() == setup.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trials": 0}, "trials must be an integer in [1, 10000000] or None, got 0"),
        ({"trials": 2.5}, "trials must be an integer in [1, 10000000] or None, got 2.5"),
        ({"trials": 10**20}, f"trials must be an integer in [1, 10000000] or None, got {10**20}"),
        ({"seed": -1}, "seed must be an integer in [0, 2147483647], got -1"),
        ({"seed": 2**32 - 1}, "seed must be an integer in [0, 2147483647], got 4294967295"),
        ({"seed": 2**63 - 1}, f"seed must be an integer in [0, 2147483647], got {2**63 - 1}"),
        ({"sampler": "anneal"}, "unknown sampler 'anneal' (known: tpe, nsga2, gp, random, auto)"),
        ({"objectives": ["accuracy", "macs"]}, "macs"),
        ({"warm_start": "lamp"}, "warm_start must be a WarmStart or None, got 'lamp'"),
        ({"space": {"criteria": []}}, "space must be a SearchSpace or None, got {'criteria': []}"),
    ],
)
def test_bad_settings_are_named(tiny_task: Task, kwargs: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        make_setup(tiny_task, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_constraint_and_no_margin_are_none(tiny_task: Task) -> None:
    setup = make_setup(tiny_task, constraints=Constraints(), early_stop=EarlyStop(margin=None))
    assert setup.constraints is None and setup.early_stop is None


def test_a_different_identity_is_refused_and_settings_may_change(tiny_task: Task) -> None:
    stored = make_setup(tiny_task)
    changed = make_setup(
        tiny_task, trials=3, sampler="random", constraints=Constraints(min_accuracy=0.5)
    )
    check_same(stored, changed, "s")  # how a study is run may change between runs
    for field, value in (
        ("seed", 1),
        ("finetune", dataclasses.replace(stored.finetune, epochs=9)),
        ("finetune", dataclasses.replace(stored.finetune, precision="bf16")),
        ("objectives", ("accuracy", "bytes")),
        ("model", "f" * 16),
    ):
        other = dataclasses.replace(stored, **{field: value})
        with pytest.raises(StorageError) as info:
            check_same(stored, other, "s")
        label = "dense model weights (fingerprint)" if field == "model" else field
        assert str(info.value).startswith(f"study 's' was created with {label} ")
    assert set(IDENTITY) < {f.name for f in dataclasses.fields(StudySetup)}


def test_precision_is_the_recipe_s_and_the_device_is_not_the_study_s(tiny_task: Task) -> None:
    """A worker joins whatever its device; a study fine-tuned in bf16 is not resumed in fp32.
    A setup stored before the recipe held a precision reads as fp32, as those studies ran."""
    setup = make_setup(dataclasses.replace(tiny_task, precision="bf16"))
    assert setup.finetune.precision == "bf16"
    assert setup.finetune.apply(tiny_task).precision == "bf16"
    check_same(
        setup, make_setup(dataclasses.replace(tiny_task, precision="bf16", device="cpu")), "s"
    )
    with pytest.raises(StorageError, match="was created with finetune .*'bf16'.*'fp32'"):
        check_same(setup, make_setup(tiny_task), "s")
    data = make_setup(tiny_task).to_dict()
    del data["finetune"]["precision"]
    assert StudySetup.from_dict(data) == make_setup(tiny_task)


def test_a_device_this_machine_lacks_is_refused_before_any_work(tiny_task: Task) -> None:
    with pytest.raises(TaskError) as info:
        make_setup(dataclasses.replace(tiny_task, device="cuda:7"))
    assert "device 'cuda:7' asked for" in str(info.value) and "\n" not in str(info.value)


def test_a_resumed_run_stores_its_settings(tiny_task: Task) -> None:
    storage = optuna.storages.InMemoryStorage()
    new_study(tiny_task, storage=storage, study_name="s", trials=3)
    assert read_setup(optuna.load_study(study_name="s", storage=storage)).trials == 3
    new_study(tiny_task, storage=storage, study_name="s", trials=5, sampler="random")
    stored = read_setup(optuna.load_study(study_name="s", storage=storage))
    assert (stored.trials, stored.sampler) == (5, "random")
    assert stored.dense  # measured once, when the study was created, and kept
    with pytest.raises(StorageError, match="was created with seed 0, not 4"):
        new_study(tiny_task, storage=storage, study_name="s", seed=4)


def test_unreadable_setups_are_one_line_errors() -> None:
    study = optuna.create_study(study_name="plain")
    assert setup_if_any(study) is None
    with pytest.raises(StorageError, match="^study 'plain' was not made by autoprune$"):
        read_setup(study)
    study.set_user_attr(STUDY_ATTR, {"format": 2, "task": "x", "colour": "red"})
    with pytest.raises(StorageError) as info:
        read_setup(study)
    assert str(info.value) == (
        f"the study's setup cannot be read by autoprune {__version__}: unknown setup key 'colour'"
    )
    study.set_user_attr(STUDY_ATTR, {"format": 2, "task": "x"})
    with pytest.raises(StorageError, match="missing .* required"):
        read_setup(study)
