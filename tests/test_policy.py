"""Policy: validated early with messages naming the value; plain data that round-trips."""

from __future__ import annotations

import json
import math

import pytest

from autoprune import Policy, SpecError
from autoprune.pruning.criteria import criteria_for

SPARSITY = {"features.0": 0.25, "classifier.1": 0.9, "classifier.3": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criterion": "nope"}, r"^unknown criterion 'nope' \(known: .*magnitude, random, "),
        ({"scope": "model"}, r"^unknown scope 'model' \(known: layer, global\)$"),
        ({"rule": "median"}, r"^unknown rule 'median' \(known: ratio, mean\)$"),
        ({"alpha": -1.0}, r"^alpha must be a finite number >= 0, got -1\.0$"),
        ({"alpha": math.inf}, r"^alpha must be a finite number >= 0, got inf$"),
        ({"alpha": "1"}, r"^alpha must be a finite number >= 0, got '1'$"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        Policy(SPARSITY, **kwargs)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(1.0, "1.0"), (-0.1, "-0.1"), (1, "1"), (math.nan, "nan"), ("0.5", "'0.5'")],
)
def test_sparsity_outside_unit_interval_names_layer_and_value(value: object, shown: str) -> None:
    sparsity = dict(SPARSITY, **{"classifier.1": value})
    with pytest.raises(SpecError) as info:
        Policy(sparsity)
    assert str(info.value) == f"sparsity of layer 'classifier.1' must be in [0, 1), got {shown}"


def test_empty_sparsity_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"^a policy must name at least one layer to prune$"):
        Policy({})


def test_boundary_values_are_accepted() -> None:
    policy = Policy({"a": 0.0, "b": 0.999999, "c": 0}, alpha=0.0)
    assert policy.sparsity == {"a": 0.0, "b": 0.999999, "c": 0.0}
    assert all(isinstance(v, float) for v in policy.sparsity.values())


@pytest.mark.parametrize("criterion", criteria_for("unstructured"))
@pytest.mark.parametrize(("scope", "rule"), [("layer", "ratio"), ("global", "mean")])
def test_json_round_trip(criterion: str, scope: str, rule: str) -> None:
    policy = Policy(SPARSITY, criterion=criterion, scope=scope, rule=rule, alpha=0.37)
    text = policy.to_json()
    assert json.loads(text) == policy.to_dict()
    again = Policy.from_json(text)
    assert again == policy
    assert again.to_json() == text
    assert Policy.from_dict(policy.to_dict()) == policy


def test_to_dict_is_plain_data() -> None:
    policy = Policy(SPARSITY, criterion="taylor", scope="global", rule="mean", alpha=2.0)
    assert policy.to_dict() == {
        "sparsity": SPARSITY,
        "criterion": "taylor",
        "scope": "global",
        "rule": "mean",
        "alpha": 2.0,
        "schedule": "oneshot",
    }
    # Changing the returned dict does not change the policy.
    data = policy.to_dict()
    data["sparsity"]["features.0"] = 0.5
    assert policy.sparsity["features.0"] == 0.25


def test_from_dict_fills_defaults() -> None:
    assert Policy.from_dict({"sparsity": {"x": 0.5}}) == Policy(
        {"x": 0.5}, criterion="magnitude", scope="layer", rule="ratio", alpha=1.0
    )


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(SpecError) as info:
        Policy.from_dict({"sparsity": {"x": 0.5}, "granularityy": "channel"})
    assert str(info.value) == (
        "unknown policy key 'granularityy' (known: sparsity, criterion, scope, rule, alpha, "
        "granularity, round_to, removed_blocks, schedule, quantization, runtime, "
        "distill, lr_scale, rewind)"
    )
    with pytest.raises(SpecError, match=r"^unknown policy key 'sparsityy' \(known: sparsity, "):
        Policy.from_json('{"sparsityy": {"x": 0.5}}')


def test_from_dict_validates() -> None:
    with pytest.raises(SpecError, match=r"sparsity of layer 'x' must be in \[0, 1\), got 1\.5"):
        Policy.from_dict({"sparsity": {"x": 1.5}})


def test_changing_the_callers_dict_does_not_change_the_policy() -> None:
    sparsity = dict(SPARSITY)
    policy = Policy(sparsity)
    sparsity["features.0"] = 0.75
    sparsity["new"] = 0.5
    del sparsity["classifier.3"]
    assert policy.sparsity == SPARSITY
    assert policy.sparsity is not sparsity


def test_policy_is_frozen() -> None:
    policy = Policy(SPARSITY)
    with pytest.raises(AttributeError):
        policy.criterion = "random"  # type: ignore[misc]


def test_layer_order_is_kept() -> None:
    policy = Policy({"b": 0.1, "a": 0.2, "c": 0.3})
    assert list(policy.sparsity) == ["b", "a", "c"]
    assert list(Policy.from_json(policy.to_json()).sparsity) == sorted(policy.sparsity)
