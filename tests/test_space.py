"""Search space: validated settings, round-trips, and trial → policy (live and replayed)."""

from __future__ import annotations

import itertools
import json
import math

import optuna
import pytest

from autoprune import Policy, SearchSpace, SpecError, suggest_policy
from autoprune.pruning.policy import RULES, SCOPES

LAYERS = ["features.0", "classifier.1", "classifier.3"]
# The per-layer parametrization, one-shot: what these tests draw (SearchSpace defaults to the
# allocation parametrization, which needs the dense model, and searches the schedule too).
# The task's own learning rate: no lr_scale param (see tests/test_recovery.py for it).
PER_LAYER = {"parametrization": "per-layer", "schedules": ("oneshot",), "lr_scale": (1.0, 1.0)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criteria": "magnitude"}, "criteria must be a non-empty list, got 'magnitude'"),
        ({"criteria": []}, "criteria must be a non-empty list, got []"),
        ({"scopes": ()}, "scopes must be a non-empty list, got ()"),
        ({"rules": "ratio"}, "rules must be a non-empty list, got 'ratio'"),
        ({"scopes": ["layer", "model"]}, "unknown scope 'model' (known: layer, global)"),
        ({"rules": ["median"]}, "unknown rule 'median' (known: ratio, mean)"),
        (
            {"sparsity": (0.5, 0.2)},
            "sparsity bounds must satisfy 0 <= low <= high < 1, got [0.5, 0.2]",
        ),
        (
            {"sparsity": (0, 1)},
            "sparsity bounds must satisfy 0 <= low <= high < 1, got [0.0, 1.0]",
        ),
        (
            {"sparsity": (-0.1, 0.5)},
            "sparsity bounds must satisfy 0 <= low <= high < 1, got [-0.1, 0.5]",
        ),
        (
            {"sparsity": (math.nan, 0.5)},
            "sparsity bounds must satisfy 0 <= low <= high < 1, got [nan, 0.5]",
        ),
        ({"sparsity": 0.5}, "sparsity must be a [low, high] pair of numbers, got 0.5"),
        ({"sparsity": (0.1,)}, "sparsity must be a [low, high] pair of numbers, got (0.1,)"),
        (
            {"sparsity": (True, 0.5)},
            "sparsity must be a [low, high] pair of numbers, got (True, 0.5)",
        ),
        ({"alpha": ("1", 2)}, "alpha must be a [low, high] pair of numbers, got ('1', 2)"),
        ({"alpha": (0, 1)}, "alpha bounds must satisfy 0 < low <= high < inf, got [0.0, 1.0]"),
        ({"alpha": (2, 1)}, "alpha bounds must satisfy 0 < low <= high < inf, got [2.0, 1.0]"),
        (
            {"alpha": (1, math.inf)},
            "alpha bounds must satisfy 0 < low <= high < inf, got [1.0, inf]",
        ),
        ({"include": "features.*"}, "include must be a list of glob strings, got 'features.*'"),
        ({"exclude": ["a", 1]}, "exclude must be a list of glob strings, got ['a', 1]"),
    ],
)
def test_bad_arguments_are_named_with_their_value(kwargs: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        SearchSpace(**kwargs)
    assert str(info.value) == message


def test_unknown_criterion_lists_the_known_ones() -> None:
    with pytest.raises(SpecError, match=r"^unknown criterion 'nope' \(known: .*magnitude, "):
        SearchSpace(criteria=["magnitude", "nope"])


def test_settings_are_normalised_to_tuples_of_floats() -> None:
    space = SearchSpace(
        criteria=["taylor"], sparsity=[0, 0.5], alpha=[1, 2], include=["a*"], exclude=[]
    )
    assert space.criteria == ("taylor",)
    assert space.sparsity == (0.0, 0.5) and all(type(v) is float for v in space.sparsity)
    assert space.alpha == (1.0, 2.0)
    assert space.include == ("a*",) and space.exclude == ()


@pytest.mark.parametrize(
    "space",
    [
        SearchSpace(),
        SearchSpace(
            criteria=["random", "taylor"],
            scopes=["global"],
            rules=["mean"],
            sparsity=(0.1, 0.1),
            alpha=(0.5, 0.5),
            include=["classifier.*"],
            exclude=["*.3"],
        ),
    ],
)
def test_dict_and_json_round_trip(space: SearchSpace) -> None:
    data = space.to_dict()
    assert SearchSpace.from_dict(data) == space
    assert SearchSpace.from_dict(json.loads(json.dumps(data))) == space
    assert SearchSpace.from_dict(data).to_dict() == data


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(SpecError) as info:
        SearchSpace.from_dict({"criteria": ["magnitude"], "sparsities": [0, 0.5]})
    assert str(info.value) == (
        "unknown search-space key 'sparsities' "
        "(known: criteria, scopes, rules, sparsity, alpha, include, exclude, granularities, "
        "channel_criteria, channel_sparsity, round_to, blocks, parametrization, allocations, "
        "schedules, quantizations, distill, lr_scale, rewinds)"
    )


def _check_policy(policy: Policy, space: SearchSpace, params: dict) -> None:
    """The policy is valid, within the space's bounds, and drawn from exactly ``params``."""
    assert isinstance(policy, Policy)
    assert list(policy.sparsity) == LAYERS
    assert policy.criterion in space.criteria
    assert policy.scope in space.scopes and policy.rule in space.rules
    low, high = space.sparsity
    assert all(low <= s <= high for s in policy.sparsity.values())
    expected_keys = {"criterion", "scope", "rule"}
    if policy.rule == "mean":
        assert space.alpha[0] <= policy.alpha <= space.alpha[1]
        assert set(policy.sparsity.values()) == {high}  # the cap of every layer
        expected_keys.add("alpha")
    else:
        assert policy.alpha == 1.0
        if policy.scope == "global":
            assert len(set(policy.sparsity.values())) == 1
            expected_keys.add("sparsity")
        else:
            expected_keys.update(f"sparsity:{name}" for name in LAYERS)
    assert set(params) == expected_keys
    Policy.from_json(policy.to_json())  # valid all the way through


@pytest.mark.parametrize(("rule", "scope"), list(itertools.product(RULES, SCOPES)))
def test_fixed_trial_gives_the_fixed_policy(rule: str, scope: str) -> None:
    space = SearchSpace(sparsity=(0.1, 0.8), alpha=(0.5, 2.0), **PER_LAYER)
    params: dict = {"criterion": "taylor", "scope": scope, "rule": rule}
    if rule == "mean":
        params["alpha"] = 1.5
    elif scope == "global":
        params["sparsity"] = 0.3
    else:
        params.update({f"sparsity:{name}": 0.1 + 0.2 * i for i, name in enumerate(LAYERS)})
    trial = optuna.trial.FixedTrial(params)
    policy = suggest_policy(trial, space, LAYERS)
    _check_policy(policy, space, trial.params)
    assert (policy.criterion, policy.scope, policy.rule) == ("taylor", scope, rule)
    if rule == "mean":
        assert policy.alpha == 1.5 and policy.sparsity == dict.fromkeys(LAYERS, 0.8)
    elif scope == "global":
        assert policy.sparsity == dict.fromkeys(LAYERS, 0.3)
    else:
        assert policy.sparsity == {name: 0.1 + 0.2 * i for i, name in enumerate(LAYERS)}


@pytest.fixture
def study_and_space() -> tuple[optuna.Study, SearchSpace]:
    """A finished in-memory study: every rule/scope pair enqueued, then some sampled trials."""
    space = SearchSpace(sparsity=(0.05, 0.9), alpha=(0.3, 3.0), **PER_LAYER)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    criteria = itertools.cycle(space.criteria)
    for rule, scope in itertools.product(RULES, SCOPES):
        study.enqueue_trial({"criterion": next(criteria), "rule": rule, "scope": scope})

    def objective(trial: optuna.Trial) -> float:
        policy = suggest_policy(trial, space, LAYERS)
        trial.set_user_attr("policy", policy.to_dict())
        return sum(policy.sparsity.values())

    study.optimize(objective, n_trials=12)
    return study, space


def test_suggest_policy_on_a_live_study(study_and_space) -> None:
    study, space = study_and_space
    combos = set()
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        policy = Policy.from_dict(trial.user_attrs["policy"])
        _check_policy(policy, space, trial.params)
        combos.add((policy.rule, policy.scope))
    assert combos == set(itertools.product(RULES, SCOPES))


def test_replaying_a_frozen_trial_rebuilds_the_same_policy(study_and_space) -> None:
    study, space = study_and_space
    for trial in study.trials:
        replayed = suggest_policy(trial, space, LAYERS)
        recorded = Policy.from_dict(trial.user_attrs["policy"])
        assert replayed == recorded
        assert replayed.to_json() == recorded.to_json()
        assert list(replayed.sparsity) == LAYERS


def test_replaying_with_a_different_space_fails_loudly(study_and_space) -> None:
    study, space = study_and_space
    other = SearchSpace(criteria=["magnitude"], **PER_LAYER)
    trial = next(t for t in study.trials if t.params["criterion"] != "magnitude")
    with pytest.raises(ValueError, match=repr(trial.params["criterion"])):
        suggest_policy(trial, other, LAYERS)
