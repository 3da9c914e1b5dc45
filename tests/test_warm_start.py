"""Structured warm starts: uniform L1 channel pruning (and with blocks removed) as first trials."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from autoprune import SearchSpace, SpecError, Task, read_setup, search, suggest_policy
from autoprune.pruning import structured
from autoprune.spec import spec_from_dict
from autoprune.study.front import front_trials
from autoprune.study.space import structured_heuristic_params
from autoprune.study.warm_start import WarmStart, enqueue_warm_starts

BLOCKS = ("stages.*.1",)


def groups_and_blocks(task: Task, space: SearchSpace) -> tuple[list[str], list[str]]:
    example = task.val[0][:2]
    groups = structured.channel_groups(task.model, example, space.include, space.exclude)
    return [g.name for g in groups], structured.removable_blocks(task.model, example, space.blocks)


def structured_space(**overrides: object) -> SearchSpace:
    kwargs: dict = {"granularities": ["structured"], "blocks": BLOCKS, "scopes": ["layer"]}
    kwargs["lr_scale"] = (1.0, 1.0)  # the task's own rate: no lr_scale param
    return SearchSpace(**(kwargs | overrides))


@pytest.mark.parametrize("remove", [False, True])
def test_params_replay_as_uniform_l1_channel_pruning(resnet_task: Task, remove: bool) -> None:
    space = structured_space(channel_criteria=["taylor", "l1"], rules=["mean", "ratio"])
    groups, blocks = groups_and_blocks(resnet_task, space)
    assert len(groups) == 6 and blocks == ["stages.0.1", "stages.1.1"]
    params = structured_heuristic_params(space, 0.5, groups, blocks, remove_blocks=remove)
    assert params is not None
    assert params == {
        "channel_criterion": "l1",
        "rule": "ratio",
        "scope": "layer",
        **{f"channels:{g}": 0.5 for g in groups},
        **{f"remove:{b}": remove for b in blocks},
    }
    policy = suggest_policy(FixedTrial(params), space, [], groups, blocks)
    assert (policy.criterion, policy.scope, policy.rule) == ("l1", "layer", "ratio")
    assert policy.granularity == "structured" and policy.sparsity == dict.fromkeys(groups, 0.5)
    assert policy.removed_blocks == (tuple(blocks) if remove else ())
    # Every group left keeps the same fraction of its channels.
    model = copy.deepcopy(resnet_task.model)
    example = resnet_task.val[0][:2]
    dense = {g.name: g.channels for g in structured.channel_groups(model, example)}
    structured.prune_structured(model, policy, example)
    for name in groups:
        if not any(name.startswith(f"{b}.") for b in policy.removed_blocks):
            kept = model.get_submodule(name).weight.shape[0]
            assert kept == structured.kept_channels(dense[name], 0.5) == dense[name] // 2


def test_mixed_and_global_only_spaces(resnet_task: Task) -> None:
    space = SearchSpace(granularities=["unstructured", "structured"], scopes=["global"])
    groups, _ = groups_and_blocks(resnet_task, space)
    params = structured_heuristic_params(space, 0.3, groups)
    assert params == {
        "granularity": "structured",
        "channel_criterion": "l1",
        "rule": "ratio",
        "scope": "global",
        "channels": 0.3,
        "lr_scale": 1.0,  # the default space searches the rate; warm starts keep the task's
    }
    policy = suggest_policy(FixedTrial(params), space, ["fc"], groups)
    assert policy.scope == "global" and policy.sparsity == dict.fromkeys(groups, 0.3)


@pytest.mark.parametrize(
    ("overrides", "ratio", "remove"),
    [
        ({"channel_criteria": ["l2", "fpgm"]}, 0.5, False),
        ({"rules": ["mean"]}, 0.5, False),
        ({"channel_sparsity": (0.0, 0.4)}, 0.5, False),
        ({"channel_sparsity": (0.6, 0.8)}, 0.5, False),
        ({"blocks": ()}, 0.5, True),
    ],
)
def test_heuristics_the_structured_space_cannot_express_are_none(
    resnet_task: Task, overrides: dict, ratio: float, remove: bool
) -> None:
    space = structured_space(**overrides)
    groups, blocks = groups_and_blocks(resnet_task, space)
    assert structured_heuristic_params(space, ratio, groups, blocks, remove_blocks=remove) is None


def test_unstructured_spaces_and_no_groups_get_none() -> None:
    assert structured_heuristic_params(SearchSpace(), 0.5, ["stem.0"]) is None
    assert structured_heuristic_params(structured_space(), 0.5, []) is None


def warm_labels(study: optuna.Study) -> list[str]:
    return [t.user_attrs["warm_start"] for t in study.get_trials(states=(TrialState.WAITING,))]


def test_ratios_rounded_to_the_same_channels_are_enqueued_once(
    resnet_task: Task, caplog: pytest.LogCaptureFixture
) -> None:
    space = structured_space(round_to=2)
    groups, blocks = groups_and_blocks(resnet_task, space)
    # Groups of 6 and 8 channels: 0.2 and 0.25 both keep 4 and 6 of them.
    assert structured.kept_channels(6, 0.2, 2) == structured.kept_channels(6, 0.25, 2) == 4
    assert structured.kept_channels(8, 0.2, 2) == structured.kept_channels(8, 0.25, 2) == 6
    warm = WarmStart(channel_sparsities=[0.2, 0.25, 0.5])
    study = optuna.create_study(directions=["maximize", "minimize"])
    with caplog.at_level(logging.INFO, logger="autoprune.study.warm_start"):
        n = enqueue_warm_starts(
            study, resnet_task, space, [], warm, groups=groups, blocks=blocks, limit=3
        )
    assert n == 3
    assert warm_labels(study) == ["l1-uniform@0.2", "l1-uniform@0.5", "l1-uniform@0.2+blocks"]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("autoprune")]
    assert messages == [
        "2 warm starts keep the same channels as an earlier one and were skipped: "
        "l1-uniform@0.25 (= l1-uniform@0.2), l1-uniform@0.25+blocks (= l1-uniform@0.2+blocks)"
    ]


def test_a_structured_study_runs_the_structured_warm_starts_first(
    resnet_task: Task, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    space = structured_space(channel_sparsity=(0.0, 0.8))
    warm = WarmStart(channel_sparsities=[0.2, 0.5, 0.9])
    objectives = ["accuracy", "macs"]
    with caplog.at_level(logging.INFO, logger="autoprune.study.warm_start"):
        study = search(
            resnet_task,
            n_trials=9,  # warm starts take at most half: the four in the space
            storage=f"sqlite:///{tmp_path / 'w.db'}",
            study_name="s",
            space=space,
            objectives=objectives,
            warm_start=warm,
        )
    labels = [t.user_attrs.get("warm_start") for t in study.trials]
    expected = ["l1-uniform@0.2", "l1-uniform@0.5", "l1-uniform@0.2+blocks"]
    assert labels == [*expected, "l1-uniform@0.5+blocks"] + [None] * 5
    # The unstructured heuristics are not even considered in a structured-only space.
    skipped = [r.getMessage() for r in caplog.records if "warm starts" in r.getMessage()]
    assert skipped == [
        "2 of 6 warm starts are outside the search space and were skipped: "
        "l1-uniform@0.9, l1-uniform@0.9+blocks"
    ]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    setup = read_setup(study)
    groups, blocks = list(setup.groups), list(setup.blocks)
    for trial in study.trials[:4]:
        label = trial.user_attrs["warm_start"]
        ratio = float(label.split("@")[1].removesuffix("+blocks"))
        remove = label.endswith("+blocks")
        assert trial.params == structured_heuristic_params(
            space, ratio, groups, blocks, remove_blocks=remove
        )
        policy = trial.user_attrs["policy"]
        assert policy["criterion"] == "l1" and policy["sparsity"] == dict.fromkeys(groups, ratio)
        assert policy["removed_blocks"] == (blocks if remove else [])
    # More removed, fewer MACs: the spread of the warm starts shows in the objective.
    macs = [t.values[1] for t in study.trials[:4]]
    assert macs[0] > macs[1] > macs[3] and macs[0] > macs[2] > macs[3]
    # The heuristics are trials of the study: each is on its front or dominated by it.
    front = front_trials(study)
    for trial in study.trials[:4]:
        acc, cost = trial.values
        assert trial.number in {t.number for t in front} or any(
            f.values[0] >= acc and f.values[1] <= cost for f in front
        )


def test_channel_sparsities_round_trip_and_are_checked() -> None:
    warm = WarmStart(channel_sparsities=[0.1, 0.4])
    assert warm.channel_sparsities == (0.1, 0.4)
    assert WarmStart.from_dict(warm.to_dict()) == warm
    assert WarmStart().channel_sparsities == (0.2, 0.3, 0.5, 0.65)
    spec = spec_from_dict({"warm_start": {"channel_sparsities": [0.5]}})
    assert spec.warm_start == WarmStart(channel_sparsities=[0.5])
    assert spec_from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match=r"^channel_sparsities must be numbers in \[0, 1\), got 1"):
        WarmStart(channel_sparsities=[0.5, 1])
    with pytest.raises(SpecError, match=r"^channel_sparsities must be a list, got 0.5"):
        WarmStart(channel_sparsities=0.5)  # type: ignore[arg-type]
