"""Search space: turns an Optuna trial into a Policy. All ``suggest_*`` calls live here."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from autoprune.criteria import CRITERIA, get_criterion
from autoprune.errors import SpecError
from autoprune.policy import RULES, SCOPES, Policy


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What a study may choose from.

    Args:
        criteria: Names of registered criteria to choose from.
        scopes: Any of ``"layer"``, ``"global"``.
        rules: Any of ``"ratio"``, ``"mean"``.
        sparsity: ``(low, high)`` bounds of every searched sparsity, within [0, 1). With the
            ``mean`` rule, ``high`` caps each layer's sparsity.
        alpha: ``(low, high)`` bounds of the ``mean`` rule's multiplier (searched on a log scale).
        include: Globs over layer names (module paths) of the layers that may be pruned.
        exclude: Globs of layers never pruned, applied after ``include``.

    Raises:
        SpecError: Naming the first bad argument and its value.
    """

    criteria: Sequence[str] = ("magnitude", "random", "sensitivity", "taylor")
    scopes: Sequence[str] = SCOPES
    rules: Sequence[str] = RULES
    sparsity: tuple[float, float] = (0.0, 0.98)
    alpha: tuple[float, float] = (0.25, 4.0)
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        for field, known in (("criteria", CRITERIA), ("scopes", SCOPES), ("rules", RULES)):
            values = getattr(self, field)
            if isinstance(values, str) or not values:
                raise SpecError(f"{field} must be a non-empty list, got {values!r}")
            for value in values:
                if value not in known:
                    if field == "criteria":
                        get_criterion(value)  # raises with the list of known criteria
                    raise SpecError(f"unknown {field[:-1]} {value!r} (known: {', '.join(known)})")
            object.__setattr__(self, field, tuple(values))
        low, high = _bounds("sparsity", self.sparsity)
        if not 0.0 <= low <= high < 1.0:
            raise SpecError(
                f"sparsity bounds must satisfy 0 <= low <= high < 1, got {[low, high]}"
            )
        a_low, a_high = _bounds("alpha", self.alpha)
        if not (0.0 < a_low <= a_high and math.isfinite(a_high)):
            raise SpecError(
                f"alpha bounds must satisfy 0 < low <= high < inf, got {[a_low, a_high]}"
            )
        object.__setattr__(self, "sparsity", (low, high))
        object.__setattr__(self, "alpha", (a_low, a_high))
        for field in ("include", "exclude"):
            globs = getattr(self, field)
            if isinstance(globs, str) or not all(isinstance(g, str) for g in globs):
                raise SpecError(f"{field} must be a list of glob strings, got {globs!r}")
            object.__setattr__(self, field, tuple(globs))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise SpecError(
                    f"unknown search-space key {key!r} (known: {', '.join(sorted(names))})"
                )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def suggest_policy(
    trial: optuna.trial.BaseTrial, space: SearchSpace, layers: Sequence[str]
) -> Policy:
    """Draw a policy for ``layers`` from ``trial``.

    Works on a live ``Trial`` (sampling) and on a ``FrozenTrial`` (replaying its params), so
    any finished trial's policy can be rebuilt from ``trial.params``.
    """
    criterion = trial.suggest_categorical("criterion", space.criteria)
    scope = trial.suggest_categorical("scope", space.scopes)
    rule = trial.suggest_categorical("rule", space.rules)
    low, high = space.sparsity
    alpha = 1.0
    if rule == "mean":
        alpha = trial.suggest_float("alpha", *space.alpha, log=True)
        sparsity = dict.fromkeys(layers, high)
    elif scope == "global":
        sparsity = dict.fromkeys(layers, trial.suggest_float("sparsity", low, high))
    else:
        sparsity = {name: trial.suggest_float(f"sparsity:{name}", low, high) for name in layers}
    return Policy(sparsity=sparsity, criterion=criterion, scope=scope, rule=rule, alpha=alpha)


def _bounds(name: str, value: Any) -> tuple[float, float]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise SpecError(f"{name} must be a [low, high] pair of numbers, got {value!r}")
    return float(value[0]), float(value[1])
