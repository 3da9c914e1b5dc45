"""Recovery settings: distillation from the dense model, a scaled and a rewound learning rate,
at the task's budget; how a search space draws them, pins them in warm starts, and replays."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import make_data
from torch import nn

from autoprune import Policy, SearchSpace, SpecError, Task
from autoprune.pruning.masks import prunable_layers
from autoprune.recovery import (
    DISTILL_TEMPERATURE,
    REWIND_PEAK,
    REWIND_WARMUP,
    Recovery,
    distill_loss,
    rewind_factor,
)
from autoprune.run.searching import search
from autoprune.study.space import heuristic_params, structured_heuristic_params, suggest_policy
from autoprune.train import fit, total_steps
from autoprune.trial import baseline, prune_and_finetune

LAYERS = ["features.0", "classifier.1", "classifier.3"]
# A space that searches no recovery setting: every trial fine-tunes with the task's recipe.
TASK_RECIPE: dict[str, Any] = {"distill": [0.0], "lr_scale": [1.0, 1.0], "rewinds": [False]}
RECOVERY_SPACE: dict[str, Any] = {
    "distill": [0.0, 0.5],
    "lr_scale": [0.5, 2.0],
    "rewinds": [False, True],
}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _recording_optimizer(made: list[torch.optim.Optimizer]) -> Any:
    def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        made.append(torch.optim.Adam(params, lr=lr))
        return made[-1]

    return optimizer


# --- fine-tuning ----------------------------------------------------------------------------


def test_distill_zero_is_the_task_s_recipe_bit_for_bit(tiny_task: Task) -> None:
    """Without distillation (a teacher given or not), the fine-tune is the plain loop: Adam at
    the task's rate over the seeded batch order, nothing else."""
    by_hand = copy.deepcopy(tiny_task.model)
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=tiny_task.lr)
    for batch in tiny_task.batches("train", shuffle=True, seed=7):
        loss = nn.functional.cross_entropy(by_hand(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for recovery in (None, Recovery(), Recovery(distill=0.0, teacher=tiny_task.model)):
        model = copy.deepcopy(tiny_task.model)
        timings: dict[str, float] = {}
        fit(model, tiny_task, seed=7, recovery=recovery, timings=timings)
        assert _equal(_state(model), _state(by_hand))
        assert "teacher" not in timings
    policy = Policy({name: 0.5 for name in LAYERS})
    a = prune_and_finetune(tiny_task, policy, seed=3)
    b = prune_and_finetune(tiny_task, dataclasses.replace(policy, distill=0.0), seed=3)
    assert a.metrics == b.metrics and _equal(_state(a.model), _state(b.model))
    assert "teacher" not in a.timings


def test_the_teacher_runs_in_eval_mode_without_grad_and_never_changes(tiny_task: Task) -> None:
    teacher = tiny_task.model
    teacher.train()  # its own mode, to be restored
    before = _state(teacher)
    student = copy.deepcopy(teacher)  # before the hook, which a copy would carry
    seen: list[tuple[bool, bool]] = []
    handle = teacher.register_forward_hook(
        lambda module, args, out: seen.append((torch.is_grad_enabled(), module.training))
    )
    try:
        timings: dict[str, float] = {}
        fit(
            student,
            tiny_task,
            seed=0,
            recovery=Recovery(distill=0.5, teacher=teacher),
            timings=timings,
        )
    finally:
        handle.remove()
    batches = tiny_task.batches_per_epoch() * tiny_task.finetune_epochs
    assert seen == [(False, False)] * batches  # once per batch, no grad, eval mode
    assert teacher.training  # its mode restored
    assert _equal(_state(teacher), before)
    assert all(p.grad is None for p in teacher.parameters())
    assert not _equal(_state(student), before)
    assert timings["teacher"] > 0


def test_distill_loss_is_the_documented_kl() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    t = DISTILL_TEMPERATURE
    p_t = torch.softmax(teacher / t, dim=1)
    p_s = torch.softmax(student / t, dim=1)
    by_hand = t**2 * (p_t * (p_t.log() - p_s.log())).sum() / 5
    assert torch.allclose(distill_loss(student, teacher), by_hand)
    assert float(distill_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    # Sequence logits: every position is a row.
    seq_s, seq_t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    flat = distill_loss(seq_s.reshape(6, 4), seq_t.reshape(6, 4))
    assert torch.allclose(distill_loss(seq_s, seq_t), flat)


def test_the_distilled_loss_mixes_as_documented() -> None:
    """One SGD step on one batch moves the weights by the gradient of
    ``(1 - d) * CE + d * T^2 * KL(teacher || student)``, computed by hand."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    student, teacher = nn.Linear(3, 3), nn.Linear(3, 3)
    task = Task(
        model=teacher,
        train=(x, y),
        val=(x, y),
        finetune_epochs=1,
        batch_size=6,
        lr=0.1,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
    )
    d, t = 0.3, DISTILL_TEMPERATURE
    by_hand = copy.deepcopy(student)
    s_logits, t_logits = by_hand(x), teacher(x).detach()
    p_t = torch.softmax(t_logits / t, dim=1)
    log_p_s = torch.log_softmax(s_logits / t, dim=1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(dim=1).mean()
    loss = (1 - d) * nn.functional.cross_entropy(s_logits, y) + d * t**2 * kl
    grads = torch.autograd.grad(loss, list(by_hand.parameters()))
    expected = [p.detach() - 0.1 * g for p, g in zip(by_hand.parameters(), grads, strict=True)]
    fit(student, task, seed=0, recovery=Recovery(distill=d, teacher=teacher))
    for got, want in zip(student.parameters(), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    plain = copy.deepcopy(by_hand)
    fit(plain, task, seed=0)
    assert not torch.allclose(plain.weight, student.weight)  # the KD term did something


def test_lr_scale_scales_the_optimizer_s_learning_rate(tiny_task: Task) -> None:
    made: list[torch.optim.Optimizer] = []
    task = dataclasses.replace(tiny_task, optimizer=_recording_optimizer(made))
    policy = Policy({name: 0.5 for name in LAYERS}, lr_scale=2.5)
    prune_and_finetune(task, policy, seed=0)
    prune_and_finetune(task, dataclasses.replace(policy, lr_scale=1.0), seed=0)
    assert [o.defaults["lr"] for o in made] == [tiny_task.lr * 2.5, tiny_task.lr]


@pytest.mark.parametrize("steps", [None, 7])
def test_rewind_replays_the_documented_schedule_over_the_same_steps(
    tiny_task: Task, steps: int | None
) -> None:
    """The rate of each step (read before it) is ``lr * lr_scale * rewind_factor``: a linear
    warm-up to ``REWIND_PEAK`` then a cosine decay; the task's own scheduler is replaced; the
    step count is the task's, with or without rewinding."""
    made: list[torch.optim.Optimizer] = []
    constant = dataclasses.replace(
        tiny_task,
        optimizer=_recording_optimizer(made),
        finetune_epochs=2,
        finetune_steps=steps,
        scheduler=lambda opt, n: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5),
    )
    budget = total_steps(constant)
    curves = []
    for recovery in (Recovery(), Recovery(rewind=True, lr_scale=0.5)):
        rates: list[float] = []

        def record(done: int, model: nn.Module, rates: list[float] = rates) -> None:
            rates.append(made[-1].param_groups[0]["lr"])

        fit(copy.deepcopy(tiny_task.model), constant, seed=0, recovery=recovery, on_step=record)
        assert len(rates) == budget  # same budget in steps
        curves.append(rates)
    assert curves[0] == [tiny_task.lr * 0.5] * budget  # the task's own scheduler
    base = tiny_task.lr * 0.5
    warmup = max(1, round(REWIND_WARMUP * budget))
    for step, rate in enumerate(curves[1]):
        if step < warmup:
            want = REWIND_PEAK * (step + 1) / warmup
        else:
            progress = (step + 1 - warmup) / (budget + 1 - warmup)
            want = REWIND_PEAK * (1 + math.cos(math.pi * progress)) / 2
        assert rate == pytest.approx(base * want)
    peak = curves[1].index(max(curves[1]))
    assert peak == warmup - 1 and max(curves[1]) == pytest.approx(base * REWIND_PEAK)
    after = curves[1][peak:]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))  # decays from the peak on


def test_rewind_factor_endpoints() -> None:
    assert rewind_factor(0, 100) == pytest.approx(REWIND_PEAK / 10)
    assert rewind_factor(9, 100) == pytest.approx(REWIND_PEAK)
    assert rewind_factor(10, 100) < REWIND_PEAK
    assert rewind_factor(99, 100) < 0.001 * REWIND_PEAK
    assert rewind_factor(0, 1) == REWIND_PEAK  # a one-step fine-tune: the peak


def test_baseline_takes_recovery_overrides(tiny_task: Task) -> None:
    result = baseline(tiny_task, "lamp", 0.6, distill=0.5, lr_scale=2.0, rewind=True)
    assert (result.policy.distill, result.policy.lr_scale, result.policy.rewind) == (
        0.5,
        2.0,
        True,
    )
    assert result.timings["teacher"] > 0
    assert result.timings["teacher"] < result.timings["finetuning"]
    plain = baseline(tiny_task, "lamp", 0.6)
    assert plain.policy == dataclasses.replace(
        result.policy, distill=0.0, lr_scale=1.0, rewind=False
    )
    assert plain.metrics != result.metrics


# --- policy ---------------------------------------------------------------------------------


def test_policy_dicts_omit_recovery_defaults_and_round_trip() -> None:
    plain = Policy({"a": 0.5})
    assert set(plain.to_dict()) == {"sparsity", "criterion", "scope", "rule", "alpha", "schedule"}
    tuned = Policy({"a": 0.5}, distill=0.5, lr_scale=2, rewind=True)
    assert tuned.to_dict()["distill"] == 0.5 and tuned.to_dict()["lr_scale"] == 2.0
    assert tuned.to_dict()["rewind"] is True
    assert Policy.from_json(tuned.to_json()) == tuned
    assert Policy.from_dict(plain.to_dict()) == plain


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distill": 1.0}, "distill must be a number in [0, 1), got 1.0"),
        ({"distill": -0.1}, "distill must be a number in [0, 1), got -0.1"),
        ({"distill": True}, "distill must be a number in [0, 1), got True"),
        ({"lr_scale": 0}, "lr_scale must be a number > 0 and <= 1000, got 0"),
        ({"lr_scale": math.inf}, "lr_scale must be a number > 0 and <= 1000, got inf"),
        ({"lr_scale": 1e300}, "lr_scale must be a number > 0 and <= 1000, got 1e+300"),
        ({"lr_scale": "2"}, "lr_scale must be a number > 0 and <= 1000, got '2'"),
        ({"rewind": 1}, "rewind must be true or false, got 1"),
    ],
)
def test_bad_policy_recovery_is_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        Policy({"a": 0.5}, **kwargs)
    assert str(info.value) == message


# --- search space ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distill": 0.5}, "distill must be a non-empty list of weights, got 0.5"),
        ({"distill": []}, "distill must be a non-empty list of weights, got []"),
        ({"distill": [0.0, 1.0]}, "distill weights must be numbers in [0, 1), got 1.0"),
        ({"distill": [False]}, "distill weights must be numbers in [0, 1), got False"),
        (
            {"lr_scale": [2.0, 0.5]},
            "lr_scale bounds must satisfy 0 < low <= high <= 1000, got [2.0, 0.5]",
        ),
        (
            {"lr_scale": [0, 1]},
            "lr_scale bounds must satisfy 0 < low <= high <= 1000, got [0.0, 1.0]",
        ),
        (
            {"lr_scale": [1, 1e300]},  # would overflow the optimizer's float32 rate mid-trial
            "lr_scale bounds must satisfy 0 < low <= high <= 1000, got [1.0, 1e+300]",
        ),
        ({"lr_scale": 1.0}, "lr_scale must be a [low, high] pair of numbers, got 1.0"),
        ({"rewinds": True}, "rewinds must be a non-empty list of true/false, got True"),
        ({"rewinds": ["yes"]}, "rewinds must be true or false, got 'yes'"),
    ],
)
def test_bad_space_recovery_is_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        SearchSpace(**kwargs)
    assert str(info.value) == message


def _drawn(space: SearchSpace, seed: int = 0, **kwargs: Any) -> tuple[dict[str, Any], Policy]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    policy = suggest_policy(trial, space, LAYERS, **kwargs)
    return trial.params, policy


def test_recovery_params_only_when_the_space_offers_a_choice(tiny_task: Task) -> None:
    model = tiny_task.model
    params, policy = _drawn(SearchSpace(**TASK_RECIPE), model=model)
    assert not {"distill", "lr_scale", "rewind"} & set(params)
    assert (policy.distill, policy.lr_scale, policy.rewind) == (0.0, 1.0, False)
    fixed = SearchSpace(distill=[0.5], lr_scale=[2.0, 2.0], rewinds=[True])
    params, policy = _drawn(fixed, model=model)
    assert not {"distill", "lr_scale", "rewind"} & set(params)
    assert (policy.distill, policy.lr_scale, policy.rewind) == (0.5, 2.0, True)
    searched = SearchSpace(**RECOVERY_SPACE)
    seen = set()
    for seed in range(12):
        params, policy = _drawn(searched, seed, model=model)
        assert {"distill", "lr_scale", "rewind"} <= set(params)
        assert (policy.distill, policy.lr_scale, policy.rewind) == (
            params["distill"],
            params["lr_scale"],
            params["rewind"],
        )
        assert 0.5 <= policy.lr_scale <= 2.0
        seen.add((policy.distill, policy.rewind))
    assert seen == {(0.0, False), (0.0, True), (0.5, False), (0.5, True)}


def test_structured_trials_draw_recovery_too() -> None:
    space = SearchSpace(granularities=["structured"], **RECOVERY_SPACE)
    params, policy = _drawn(space, groups=["features.0", "classifier.1"])
    assert policy.granularity == "structured"
    assert {"distill", "lr_scale", "rewind"} <= set(params)
    assert policy.lr_scale == params["lr_scale"]


def test_warm_starts_pin_the_task_s_recovery(tiny_task: Task) -> None:
    model = tiny_task.model
    plain = SearchSpace(**TASK_RECIPE)
    searched = SearchSpace(**RECOVERY_SPACE)
    base = heuristic_params(plain, "lamp", 0.9, model, LAYERS, "gradual")
    pinned = heuristic_params(searched, "lamp", 0.9, model, LAYERS, "gradual")
    assert base is not None and not {"distill", "lr_scale", "rewind"} & set(base)
    assert pinned == base | {"distill": 0.0, "lr_scale": 1.0, "rewind": False}
    fixed = optuna.trial.FixedTrial(pinned)
    assert suggest_policy(fixed, searched, LAYERS, model=model) == suggest_policy(
        optuna.trial.FixedTrial(base), plain, LAYERS, model=model
    )
    # A space that cannot fine-tune with the task's own settings has no heuristic warm start.
    for settings in ({"distill": [0.5]}, {"lr_scale": [1.5, 2]}, {"rewinds": [True]}):
        assert heuristic_params(SearchSpace(**settings), "lamp", 0.9, model, LAYERS) is None
    structured = SearchSpace(granularities=["structured"], **RECOVERY_SPACE)
    params = structured_heuristic_params(structured, 0.5, ["features.0"])
    assert params is not None
    assert {k: params[k] for k in ("distill", "lr_scale", "rewind")} == {
        "distill": 0.0,
        "lr_scale": 1.0,
        "rewind": False,
    }
    no_task_rate = SearchSpace(granularities=["structured"], lr_scale=[2, 3])
    assert structured_heuristic_params(no_task_rate, 0.5, ["features.0"]) is None


def test_the_default_space_searches_the_learning_rate_only(tiny_task: Task) -> None:
    """The measured defaults (scripts/bench_recovery.py, README): the fine-tune learning rate
    from half to 16 times the task's; distillation and rewinding available, off."""
    space = SearchSpace()
    assert (space.distill, space.lr_scale, space.rewinds) == ((0.0,), (0.5, 16.0), (False,))
    params, policy = _drawn(space, model=tiny_task.model)
    assert {"distill", "lr_scale", "rewind"} & set(params) == {"lr_scale"}
    assert policy.lr_scale == params["lr_scale"] and policy.distill == 0.0 and not policy.rewind
    warm = heuristic_params(space, "lamp", 0.9, tiny_task.model, LAYERS)
    assert warm is not None and warm["lr_scale"] == 1.0


def test_space_dicts_round_trip_with_recovery() -> None:
    space = SearchSpace(**RECOVERY_SPACE)
    assert space.distill == (0.0, 0.5) and space.rewinds == (False, True)
    assert SearchSpace.from_dict(space.to_dict()) == space


@pytest.mark.slow
def test_a_study_s_recovery_trials_replay_to_the_same_numbers(tiny_task: Task) -> None:
    space = SearchSpace(**RECOVERY_SPACE, criteria=["magnitude"])
    study = search(tiny_task, n_trials=4, space=space, warm_start=None, seed=1)
    layers = prunable_layers(tiny_task.model)
    for trial in study.trials:
        policy = suggest_policy(trial, space, layers, model=tiny_task.model)
        assert policy == Policy.from_dict(trial.user_attrs["policy"])
        replayed = prune_and_finetune(tiny_task, policy, seed=trial.user_attrs["seed"])
        assert replayed.metrics["accuracy"] == trial.values[0]
    drawn = {(t.params["distill"], t.params["rewind"]) for t in study.trials}
    assert len(drawn) > 1


def test_distillation_on_data_without_targets_uses_the_task_s_own_loss() -> None:
    """A Task whose loss is its own hook (no targets in the batch) distills too."""
    torch.manual_seed(0)
    x, _ = make_data(64, 0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    task = Task(
        model=teacher,
        train=[x[i : i + 16] for i in range(0, 64, 16)],
        val=[x[:16]],
        batch_loss=lambda outputs, batch: outputs.pow(2).mean(),
        evaluate=lambda model, batches: 0.0,
        finetune_epochs=1,
    )
    student = copy.deepcopy(teacher)
    timings: dict[str, float] = {}
    fit(student, task, seed=0, recovery=Recovery(distill=0.5, teacher=teacher), timings=timings)
    assert "teacher" in timings


# --- report ---------------------------------------------------------------------------------


def _study_with_recovery() -> optuna.Study:
    from conftest import hand_setup
    from optuna.trial import create_trial

    study = optuna.create_study(directions=["maximize", "minimize"], study_name="recovery")
    hand_setup(study, accuracy=1.0)
    recovery = [{}, {"distill": 0.5, "rewind": True}, {"lr_scale": 2.0}]
    for i, (settings, values) in enumerate(
        zip(recovery, [(0.9, 100.0), (0.95, 200.0), (0.99, 400.0)], strict=True)
    ):
        policy = {"sparsity": {"a": 0.9}, "criterion": "magnitude", "scope": "layer"}
        policy |= {"rule": "ratio", "alpha": 1.0, "schedule": "oneshot", **settings}
        attrs = {"policy": policy, "seed": i, "density": values[1] / 1000, "total_params": 1e3}
        study.add_trial(create_trial(values=list(values), user_attrs=attrs))
    return study


def test_the_report_s_recovery_defaults_are_the_policy_s() -> None:
    from autoprune.pruning.policy import RECOVERY_DEFAULTS
    from autoprune.report.data import RECOVERY_DEFAULTS as REPORTED

    assert REPORTED == RECOVERY_DEFAULTS
    fields = {f.name: f.default for f in dataclasses.fields(Policy)}
    assert {key: fields[key] for key in RECOVERY_DEFAULTS} == RECOVERY_DEFAULTS


def test_front_tables_show_recovery_settings_where_a_trial_has_them() -> None:
    from autoprune.report.data import front_share, pareto_front, trials_frame

    front = pareto_front(_study_with_recovery())
    columns = list(front.columns)
    at = columns.index("schedule")
    assert columns[at + 1 : at + 4] == ["distill", "lr_scale", "rewind"]
    assert list(front["distill"]) == [0.0, 0.5, 0.0]  # the task's own where not in the dict
    assert list(front["lr_scale"]) == [1.0, 1.0, 2.0]
    assert list(front["rewind"]) == [False, True, False]
    share = front_share(trials_frame(_study_with_recovery())).set_index(["aspect", "value"])
    assert share.loc[("rewind", True), "trials"] == 1
    assert share.loc[("distill", 0.0), "trials"] == 2
    plain = pareto_front(_plain_study())
    assert not {"distill", "lr_scale", "rewind"} & set(plain.columns)


def _plain_study() -> optuna.Study:
    """The same study with every trial at the task's own recovery settings."""
    study = _study_with_recovery()
    fresh = optuna.create_study(directions=["maximize", "minimize"], study_name="plain")
    fresh.set_user_attr("autoprune", study.user_attrs["autoprune"])
    for trial in study.trials:
        attrs = dict(trial.user_attrs)
        attrs["policy"] = {
            k: v for k, v in attrs["policy"].items() if k not in ("distill", "lr_scale", "rewind")
        }
        fresh.add_trial(optuna.trial.create_trial(values=trial.values, user_attrs=attrs))
    return fresh


def test_spec_space_keys_reach_the_search_space(tmp_path: Path) -> None:
    from autoprune.spec import load_spec

    path = tmp_path / "s.toml"
    path.write_text(
        'task = "digits-cnn"\n[space]\ndistill = [0.0, 0.5]\nlr_scale = [0.5, 2]\n'
        "rewinds = [false, true]\n"
    )
    space = load_spec(path).space
    assert (space.distill, space.lr_scale, space.rewinds) == (
        (0.0, 0.5),
        (0.5, 2.0),
        (False, True),
    )
    path.write_text('task = "digits-cnn"\n[space]\ndistill = [1.5]\n')
    with pytest.raises(SpecError, match=r"distill weights must be numbers in \[0, 1\), got 1.5"):
        load_spec(path)


def test_a_space_stored_before_recovery_settings_searches_none(tiny_task: Task) -> None:
    """Whatever the defaults, a study stored without these keys replays without their params."""
    from autoprune import make_setup
    from autoprune.study.setup import StudySetup

    stored = SearchSpace().to_dict()
    for key in ("distill", "lr_scale", "rewinds"):
        del stored[key]
    space = SearchSpace.from_stored(stored)
    assert (space.distill, space.lr_scale, space.rewinds) == ((0.0,), (1.0, 1.0), (False,))
    searched = SearchSpace(**RECOVERY_SPACE)
    assert SearchSpace.from_stored(searched.to_dict()) == searched
    data = make_setup(tiny_task, space=searched).to_dict()
    data["space"] = stored
    assert StudySetup.from_dict(data).space == space
