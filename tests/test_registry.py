"""The shared registry and plain-data helpers of autoprune._registry."""

from __future__ import annotations

import dataclasses

import pytest

from autoprune import ALLOCATIONS, CRITERIA
from autoprune._registry import Registry, check_keys, from_dict, to_dict
from autoprune.errors import SpecError
from autoprune.measure import OBJECTIVES
from autoprune.pruning.policy import SCHEDULES
from autoprune.pruning.schedule import SCHEDULE_FUNCTIONS
from autoprune.study.samplers import SAMPLERS
from autoprune.study.space import PARAMETRIZATIONS


def _colours() -> Registry[int]:
    return Registry("colour", {"red": 1, "green": 2, "blue": 3})


def test_items_are_read_by_name_in_registration_order() -> None:
    r = _colours()
    r.register("amber", 4)
    assert list(r) == ["red", "green", "blue", "amber"]
    assert r.names() == ("red", "green", "blue", "amber")
    assert r.items() == [("red", 1), ("green", 2), ("blue", 3), ("amber", 4)]
    assert len(r) == 4
    assert r["green"] == r.get("green") == 2
    assert "blue" in r and "pink" not in r
    assert ", ".join(r) == "red, green, blue, amber"


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(SpecError) as info:
        _colours().get("pink")
    assert str(info.value) == "unknown colour 'pink' (known: red, green, blue)"
    with pytest.raises(SpecError, match=r"^unknown colour 'pink' \(known: red, "):
        _colours()["pink"]
    with pytest.raises(SpecError, match=r"^unknown colour 'x' \(known: none\)$"):
        Registry[int]("colour").get("x")


def test_unhashable_names_are_unknown_not_type_errors() -> None:
    assert ["red"] not in _colours()
    with pytest.raises(SpecError, match=r"^unknown colour \['red'\] "):
        _colours().get(["red"])  # type: ignore[arg-type]


def test_a_duplicate_is_refused_unless_replaced_in_place() -> None:
    r = _colours()
    with pytest.raises(SpecError, match=r"^colour 'green' is already registered$"):
        r.register("green", 20)
    assert r["green"] == 2
    assert r.register("green", 20, replace=True) == 20
    assert r.items() == [("red", 1), ("green", 20), ("blue", 3)]  # kept its place
    with pytest.raises(SpecError, match=r"^colour 'red' is already registered$"):
        Registry("colour", {"red": 1}).register("red", 1)


def test_names_must_be_non_empty_strings() -> None:
    for bad in ("", None, 3):
        with pytest.raises(SpecError, match=r"^colour name must be a non-empty string, got "):
            _colours().register(bad, 0)  # type: ignore[arg-type]


def test_unregister_returns_the_item_and_forgets_the_name() -> None:
    r = _colours()
    assert r.unregister("green") == 2
    assert list(r) == ["red", "blue"] and "green" not in r
    with pytest.raises(SpecError, match=r"^unknown colour 'green' \(known: red, blue\)$"):
        r.unregister("green")
    r.register("green", 5)
    assert list(r) == ["red", "blue", "green"]


def test_iterating_while_registering_sees_a_snapshot() -> None:
    r = _colours()
    for name in r:
        r.register(name + "2", 0)
    assert len(r) == 6


def test_the_package_registries_use_it() -> None:
    """Every name -> item table of autoprune is a Registry, with messages naming its kind."""
    kinds = {
        "criterion": CRITERIA,
        "allocation": ALLOCATIONS,
        "schedule": SCHEDULE_FUNCTIONS,
        "objective": OBJECTIVES,
        "sampler": SAMPLERS,
        "parametrization": PARAMETRIZATIONS,
    }
    for kind, registry in kinds.items():
        assert isinstance(registry, Registry) and registry.kind == kind
        with pytest.raises(SpecError, match=rf"^unknown {kind} 'nope' \(known: "):
            registry.get("nope")
    assert SCHEDULE_FUNCTIONS.names() == SCHEDULES
    assert list(ALLOCATIONS) == ["uniform", "global", "lamp", "erk"]
    assert list(SAMPLERS) == ["tpe", "nsga2", "gp", "random", "auto"]
    assert list(PARAMETRIZATIONS) == ["per-layer", "allocation"]
    assert "accuracy" not in OBJECTIVES and "nonzero_params" in OBJECTIVES


@dataclasses.dataclass(frozen=True)
class _Settings:
    size: int = 1
    names: tuple[str, ...] = ("a",)
    label: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))


def test_from_dict_round_trips_through_plain_data() -> None:
    settings = _Settings(size=3, names=("x", "y"))
    data = to_dict(settings)
    assert data == {"size": 3, "names": ["x", "y"], "label": None}
    assert from_dict(_Settings, data, "settings key") == settings
    assert from_dict(_Settings, {}, "settings key") == _Settings()  # defaults fill in


def test_unknown_keys_are_named_with_the_fields_in_declaration_order() -> None:
    with pytest.raises(SpecError) as info:
        from_dict(_Settings, {"size": 2, "colour": "red", "shape": 1}, "settings key")
    assert str(info.value) == "unknown settings key 'colour' (known: size, names, label)"
    with pytest.raises(SpecError, match=r"^unknown table 'b' \(known: a, c\)$"):
        check_keys({"a": 1, "b": 2}, ["a", "c"], "table")
    check_keys({"label": "x"}, _Settings, "key")  # known keys pass
