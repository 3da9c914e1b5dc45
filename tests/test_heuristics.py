"""Heuristics as baselines and warm starts; the allocation parametrization; samplers by name."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autoprune import SearchSpace, SpecError, Task, search, suggest_policy
from autoprune.cli import main
from autoprune.pruning.allocation import ALLOCATIONS, heuristic_policy
from autoprune.pruning.masks import prunable_layers
from autoprune.spec import StudySpec, spec_from_dict
from autoprune.study.samplers import SAMPLERS, make_sampler
from autoprune.study.space import heuristic_params
from autoprune.study.warm_start import WarmStart, enqueue_warm_starts
from autoprune.trial import baseline, prune_and_finetune


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'h.db'}"


def test_baseline_is_the_heuristic_policy_fine_tuned(tiny_task: Task) -> None:
    layers = prunable_layers(tiny_task.model)
    result = baseline(tiny_task, "lamp", 0.8, seed=3)
    expected = prune_and_finetune(
        tiny_task, heuristic_policy("lamp", tiny_task.model, layers, 0.8), seed=3
    )
    assert result.policy == expected.policy
    assert result.metrics == expected.metrics
    total = sum(dict(tiny_task.model.named_modules())[k].weight.numel() for k in layers)
    assert result.metrics["nonzero_params"] == total - round(0.8 * total)


@pytest.mark.parametrize("parametrization", ["per-layer", "allocation"])
@pytest.mark.parametrize("name", list(ALLOCATIONS))
def test_heuristic_params_draw_the_heuristic_policy(
    tiny_task: Task, parametrization: str, name: str
) -> None:
    model, layers = tiny_task.model, prunable_layers(tiny_task.model)
    space = SearchSpace(parametrization=parametrization, sparsity=(0.0, 0.999))
    params = heuristic_params(space, name, 0.9, model, layers)
    assert params is not None
    policy = suggest_policy(optuna.trial.FixedTrial(params), space, layers, model=model)
    expected = heuristic_policy(name, model, layers, 0.9)
    if policy.scope == "global":  # global magnitude as the global scope: the same masks
        assert name == "global" and set(policy.sparsity.values()) == {0.9}
    else:
        assert policy == expected


def test_heuristics_the_space_cannot_express_are_none(tiny_task: Task) -> None:
    model, layers = tiny_task.model, prunable_layers(tiny_task.model)
    per_layer = {"parametrization": "per-layer"}
    assert heuristic_params(SearchSpace(criteria=["taylor"]), "lamp", 0.9, model, layers) is None
    assert heuristic_params(SearchSpace(sparsity=(0, 0.8)), "lamp", 0.9, model, layers) is None
    space = SearchSpace(rules=["mean"], **per_layer)
    assert heuristic_params(space, "lamp", 0.9, model, layers) is None
    space = SearchSpace(parametrization="allocation", allocations=["erk"])
    assert heuristic_params(space, "lamp", 0.9, model, layers) is None
    # Per-layer sparsities beyond the bounds are clipped to them.
    space = SearchSpace(sparsity=(0.0, 0.9), **per_layer)
    params = heuristic_params(space, "lamp", 0.9, model, layers)
    assert params is not None
    assert max(v for k, v in params.items() if k.startswith("sparsity:")) == 0.9


@pytest.mark.slow
@pytest.mark.parametrize("parametrization", ["per-layer", "allocation"])
def test_a_new_study_runs_the_warm_starts_first(
    tiny_task: Task, tmp_path: Path, parametrization: str, caplog: pytest.LogCaptureFixture
) -> None:
    space = SearchSpace(
        parametrization=parametrization, sparsity=(0.0, 0.95), schedules=["oneshot"]
    )
    warm = WarmStart(allocations=["lamp", "uniform"], sparsities=[0.5, 0.9, 0.99])
    with caplog.at_level(logging.INFO, logger="autoprune.study.warm_start"):
        study = search(
            tiny_task,
            n_trials=8,  # warm starts take at most half: the four in the space
            storage=url(tmp_path),
            study_name="s",
            space=space,
            warm_start=warm,
        )
    labels = [t.user_attrs.get("warm_start") for t in study.trials]
    assert labels == ["lamp@0.5", "uniform@0.5", "lamp@0.9", "uniform@0.9"] + [None] * 4
    skipped = [r.getMessage() for r in caplog.records if "warm starts" in r.getMessage()]
    # The space has no gradual schedule, so the gradual warm starts are skipped too.
    assert (
        len(skipped) == 1
        and skipped[0].startswith(
            "10 of 14 warm starts are outside the search space and were skipped: lamp@0.99, "
            "uniform@0.99, lamp@0.5 gradual,"
        )
        and skipped[0].endswith("erk@0.99, erk@0.99 gradual")
    )  # uniform is an allocation already
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    layers = prunable_layers(tiny_task.model)
    for trial in study.trials[:4]:
        name, target = trial.user_attrs["warm_start"].split("@")
        expected = heuristic_policy(name, tiny_task.model, layers, float(target))
        assert trial.user_attrs["policy"]["sparsity"] == pytest.approx(expected.sparsity)
    # A resumed study enqueues nothing more; n_trials is the study's total.
    again = search(
        tiny_task, n_trials=9, storage=url(tmp_path), study_name="s", space=space, warm_start=warm
    )
    assert len(again.trials) == 9 and "warm_start" not in again.trials[-1].user_attrs


def test_allocation_trials_hit_their_target_exactly(tiny_task: Task) -> None:
    space = SearchSpace(parametrization="allocation", criteria=["magnitude", "taylor"])
    study = search(tiny_task, n_trials=4, seed=1, space=space, sampler="random")
    total = study.user_attrs["autoprune"]["dense"]["total_params"]
    for trial in study.trials:
        target = 1.0 - max(trial.params["density"], 1.0 - space.sparsity[1])  # clipped
        assert trial.values[1] == total - round(target * total)
        assert set(trial.params) >= {"criterion", "allocation", "density"}


def test_densities_drawn_below_the_bound_are_the_bound(tiny_task: Task) -> None:
    model, layers = tiny_task.model, prunable_layers(tiny_task.model)
    space = SearchSpace(parametrization="allocation", sparsity=(0.0, 0.98))
    params = heuristic_params(space, "lamp", 0.98, model, layers)
    assert params is not None
    bound = suggest_policy(optuna.trial.FixedTrial(params), space, layers, model=model)
    below = suggest_policy(
        optuna.trial.FixedTrial(params | {"density": 0.0165}), space, layers, model=model
    )
    assert below == bound


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"allocations": "lamp"}, "allocations must be a list, got 'lamp'"),
        ({"allocations": ["lampp"]}, "unknown allocation 'lampp'"),
        ({"sparsities": 0.9}, "sparsities must be a list, got 0.9"),
        ({"sparsities": [0.5, 1.0]}, r"sparsities must be numbers in \[0, 1\), got 1.0"),
        ({"sparsities": [True]}, r"sparsities must be numbers in \[0, 1\), got True"),
        ({"targets": [0.5]}, "unknown warm-start key 'targets' "),
        ({"extreme_allocations": "erk"}, "extreme_allocations must be a list, got 'erk'"),
        ({"extreme_allocations": ["erkk"]}, "unknown allocation 'erkk'"),
        ({"extreme_from": 1.5}, r"extreme_from must be a number in \[0, 1\], got 1.5$"),
        ({"extreme_from": True}, r"extreme_from must be a number in \[0, 1\], got True$"),
    ],
)
def test_bad_warm_starts_are_named(data: dict, message: str) -> None:
    with pytest.raises(SpecError, match=f"^{message}"):
        WarmStart.from_dict(data)


def test_extreme_allocations_come_last_at_the_extreme_targets_only() -> None:
    warm = WarmStart(allocations=["lamp", "uniform"], sparsities=[0.9, 0.95, 0.98])
    schedules = ("oneshot", "gradual")
    assert warm.heuristics() == [
        (s, t, a) for s in schedules for t in (0.9, 0.95, 0.98) for a in ("lamp", "uniform")
    ] + [(s, t, "erk") for s in schedules for t in (0.95, 0.98)]
    assert len(WarmStart(extreme_allocations=[]).heuristics()) == 20
    only = WarmStart(allocations=["lamp"], sparsities=[0.9, 0.95], extreme_from=0.9)
    assert only.heuristics()[4:] == [
        (s, t, a) for s in ("oneshot", "gradual") for t in (0.9, 0.95) for a in ("erk", "uniform")
    ]


def test_a_small_budget_keeps_the_main_warm_starts(tiny_task: Task) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    space = SearchSpace(schedules=["oneshot"])
    layers = prunable_layers(tiny_task.model)
    warm = WarmStart(sparsities=[0.9, 0.95])
    assert enqueue_warm_starts(study, tiny_task, space, layers, warm, limit=5) == 5
    labels = [t.user_attrs["warm_start"] for t in study.get_trials(deepcopy=False)]
    assert labels == ["lamp@0.9", "global@0.9", "lamp@0.95", "global@0.95", "erk@0.95"]


def test_warm_start_round_trips() -> None:
    warm = WarmStart(allocations=["erk"], sparsities=[0.5, 0.9])
    assert WarmStart.from_dict(warm.to_dict()) == warm
    assert warm.sparsities == (0.5, 0.9)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_is_built_seeded_and_searches(tiny_task: Task, name: str) -> None:
    sampler = make_sampler(name, seed=7, space=SearchSpace())
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    first = search(tiny_task, n_trials=2, seed=7, sampler=name)
    second = search(tiny_task, n_trials=2, seed=7, sampler=name)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]


def test_unknown_sampler_is_named() -> None:
    with pytest.raises(SpecError, match=r"^unknown sampler 'cmaes' \(known: tpe, nsga2, gp"):
        make_sampler("cmaes", seed=0, space=SearchSpace())


@pytest.mark.slow
def test_prune_command_prints_and_saves_the_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text('task = "digits-mlp"\nseed = 0\n[finetune]\nepochs = 1\n')
    out = tmp_path / "m.pt"
    code = main(["prune", str(spec), "--policy", "erk", "--sparsity", "0.9", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert text.startswith("erk at 0.9 on digits-mlp, 1 fine-tuning epochs: sparsity 0.9000")
    assert "1702 of 17024 weights left" in text
    assert all(f"\n  {layer}: sparsity " in text for layer in ("0", "2", "4"))
    state = torch.load(out, weights_only=True)
    zeros = sum(int((state[f"{k}.weight"] == 0).sum()) for k in ("0", "2", "4"))
    assert zeros == round(0.9 * 17024)


def test_prune_command_takes_the_schedule_and_recovery_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text('task = "digits-mlp"\nseed = 0\n[finetune]\nsteps = 3\n')
    argv = ["--policy", "lamp", "--sparsity", "0.9", "--schedule", "gradual"]
    argv += ["--lr-scale", "4", "--distill", "0.5", "--rewind"]
    assert main(["prune", str(spec), *argv]) == 0
    assert capsys.readouterr().out.startswith(
        "lamp at 0.9 (gradual) on digits-mlp, 3 fine-tuning steps, distill 0.5, lr_scale 4, "
        "rewound: sparsity 0.9000"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "lampp", "--sparsity", "0.9"], "invalid choice: 'lampp'"),
        (["--policy", "lamp", "--sparsity", "1"], "must be a number in [0, 1), got '1'"),
        (["--policy", "lamp", "--sparsity", "0.9", "--lr-scale", "0"], "<= 1000, got '0'"),
        (["--policy", "lamp", "--sparsity", "0.9", "--lr-scale", "1e9"], "got '1e9'"),
        (["--policy", "lamp", "--sparsity", "0.9", "--lr-scale", "nan"], "got 'nan'"),
        (["--policy", "lamp", "--sparsity", "0.9", "--distill", "1"], "in [0, 1), got '1'"),
        (["--policy", "lamp", "--sparsity", "0.9", "--schedule", "slow"], "choice: 'slow'"),
    ],
)
def test_prune_command_names_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text('task = "digits-mlp"\n')
    with pytest.raises(SystemExit) as info:
        main(["prune", str(spec), *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_spec_reads_sampler_parametrization_and_warm_start(tmp_path: Path) -> None:
    text = (
        'sampler = "gp"\n[space]\nparametrization = "allocation"\nallocations = ["erk"]\n'
        '[warm_start]\nallocations = ["global"]\nsparsities = [0.9]\n'
    )
    spec = spec_from_dict(tomllib.loads(text))
    assert spec.sampler == "gp"
    assert spec.space.parametrization == "allocation" and spec.space.allocations == ("erk",)
    assert spec.warm_start == WarmStart(allocations=["global"], sparsities=[0.9])
    assert StudySpec().warm_start == WarmStart()  # on by default


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sampler": "cmaes"}, "key 'sampler' must be one of tpe, nsga2, gp, random, auto, got"),
        ({"warm_start": {"sparsities": [2]}}, "[warm_start] sparsities must be numbers in"),
        ({"warm_start": 3}, "key 'warm_start' must be a table, got 3"),
        ({"space": {"parametrization": "joint"}}, "[space] unknown parametrization 'joint'"),
        ({"space": {"allocations": ["lamp", "x"]}}, "[space] unknown allocation 'x'"),
    ],
)
def test_spec_names_bad_new_keys(data: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    assert str(info.value).startswith(message)
