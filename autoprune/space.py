"""Search space: turns an Optuna trial into a Policy. All ``suggest_*`` calls live here."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from autoprune.criteria import CRITERIA, GRANULARITIES, get_criterion
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
            Structured pruning names a channel group by its first layer: the same globs pick
            the groups.
        exclude: Globs of layers never pruned, applied after ``include``.
        granularities: Any of ``"unstructured"`` (weights zeroed), ``"structured"`` (output
            channels and neurons removed); both searches them within one study.
        channel_criteria: Criteria of structured trials (they must score channels).
        channel_sparsity: ``(low, high)`` bounds of the fraction of a channel group removed.
        round_to: Structured: kept channel counts are multiples of this.
        blocks: Globs of residual blocks (module paths) that structured trials may remove as a
            whole; each matched block is a searched yes/no.

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
    granularities: Sequence[str] = ("unstructured",)
    channel_criteria: Sequence[str] = ("l1", "l2", "fpgm", "taylor", "random")
    channel_sparsity: tuple[float, float] = (0.0, 0.9)
    round_to: int = 1
    blocks: Sequence[str] = ()

    def __post_init__(self) -> None:
        for field, known in (
            ("criteria", CRITERIA),
            ("scopes", SCOPES),
            ("rules", RULES),
            ("granularities", GRANULARITIES),
            ("channel_criteria", CRITERIA),
        ):
            values = getattr(self, field)
            if isinstance(values, str) or not values:
                raise SpecError(f"{field} must be a non-empty list, got {values!r}")
            for value in values:
                if value not in known:
                    if known is CRITERIA:
                        get_criterion(value)  # raises with the list of known criteria
                    what = "granularity" if field == "granularities" else field[:-1]
                    raise SpecError(f"unknown {what} {value!r} (known: {', '.join(known)})")
                if field == "criteria":
                    get_criterion(value, "unstructured")
                elif field == "channel_criteria":
                    get_criterion(value, "structured")
            object.__setattr__(self, field, tuple(values))
        self._check_structured()
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

    def _check_structured(self) -> None:
        low, high = _bounds("channel_sparsity", self.channel_sparsity)
        if not 0.0 <= low <= high < 1.0:
            raise SpecError(
                f"channel_sparsity bounds must satisfy 0 <= low <= high < 1, got {[low, high]}"
            )
        object.__setattr__(self, "channel_sparsity", (low, high))
        round_to = self.round_to
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise SpecError(f"round_to must be an integer >= 1, got {round_to!r}")
        if isinstance(self.blocks, str) or not all(isinstance(g, str) for g in self.blocks):
            raise SpecError(f"blocks must be a list of glob strings, got {self.blocks!r}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if "structured" not in self.granularities and (self.blocks or round_to != 1):
            raise SpecError("round_to and blocks need 'structured' in granularities")

    def to_dict(self) -> dict[str, Any]:
        """Plain data; settings of structured pruning only where they differ from the
        defaults, so that studies made before they existed compare equal and resume."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _STRUCTURED_FIELDS and value == f.default:
                continue
            data[f.name] = value if isinstance(value, int) else list(value)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise SpecError(
                    f"unknown search-space key {key!r} (known: {', '.join(sorted(names))})"
                )
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**kwargs)


_STRUCTURED_FIELDS = (
    "granularities",
    "channel_criteria",
    "channel_sparsity",
    "round_to",
    "blocks",
)


def suggest_policy(
    trial: optuna.trial.BaseTrial,
    space: SearchSpace,
    layers: Sequence[str],
    groups: Sequence[str] = (),
    blocks: Sequence[str] = (),
) -> Policy:
    """Draw a policy for ``layers`` (unstructured) or channel ``groups`` (structured, see
    :func:`autoprune.structured.channel_groups`) from ``trial``; structured trials may remove
    any of the residual ``blocks``.

    Works on a live ``Trial`` (sampling) and on a ``FrozenTrial`` (replaying its params), so
    any finished trial's policy can be rebuilt from ``trial.params``.
    """
    granularity = space.granularities[0]
    if len(space.granularities) > 1:
        granularity = trial.suggest_categorical("granularity", space.granularities)
    structured = granularity == "structured"
    if structured:
        criterion = trial.suggest_categorical("channel_criterion", space.channel_criteria)
    else:
        criterion = trial.suggest_categorical("criterion", space.criteria)
    scope = trial.suggest_categorical("scope", space.scopes)
    rule = trial.suggest_categorical("rule", space.rules)
    prefix, names = ("channels", groups) if structured else ("sparsity", layers)
    low, high = space.channel_sparsity if structured else space.sparsity
    alpha = 1.0
    if rule == "mean":
        alpha = trial.suggest_float("alpha", *space.alpha, log=True)
        sparsity = dict.fromkeys(names, high)
    elif scope == "global":
        sparsity = dict.fromkeys(names, trial.suggest_float(prefix, low, high))
    else:
        sparsity = {name: trial.suggest_float(f"{prefix}:{name}", low, high) for name in names}
    if not structured:
        return Policy(sparsity=sparsity, criterion=criterion, scope=scope, rule=rule, alpha=alpha)
    removed = tuple(b for b in blocks if trial.suggest_categorical(f"remove:{b}", (False, True)))
    return Policy(
        sparsity=sparsity,
        criterion=criterion,
        scope=scope,
        rule=rule,
        alpha=alpha,
        granularity=granularity,
        round_to=space.round_to,
        removed_blocks=removed,
    )


def _bounds(name: str, value: Any) -> tuple[float, float]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise SpecError(f"{name} must be a [low, high] pair of numbers, got {value!r}")
    return float(value[0]), float(value[1])
