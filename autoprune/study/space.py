"""Search space: turns an Optuna trial into a Policy. All ``suggest_*`` calls live here."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from torch import nn

from autoprune._registry import Registry, from_dict, to_dict
from autoprune.errors import SpecError
from autoprune.pruning.allocation import allocate, get_allocation, reallocate
from autoprune.pruning.criteria import CRITERIA, GRANULARITIES, get_criterion
from autoprune.pruning.policy import (
    MAX_LR_SCALE,
    QUANTIZATIONS,
    RULES,
    SCHEDULES,
    SCOPES,
    Policy,
)
from autoprune.study.recovery_space import check_recovery, suggest_recovery, task_recovery_params


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
            Structured pruning names a channel group by its first layer (a transformer's
            heads by their attention module): the same globs pick the groups. A Hugging Face
            model's head and embeddings are pruned only when a glob other than ``*`` names
            them (see :func:`autoprune.pruning.masks.prunable_layers`).
        exclude: Globs of layers never pruned, applied after ``include``.
        granularities: Any of ``"unstructured"`` (weights zeroed), ``"structured"`` (output
            channels and neurons removed); both searches them within one study.
        channel_criteria: Criteria of structured trials (they must score channels).
        channel_sparsity: ``(low, high)`` bounds of the fraction of a channel group removed.
        round_to: Structured: kept channel counts are multiples of this.
        blocks: Globs of residual blocks (module paths) that structured trials may remove as a
            whole; each matched block is a searched yes/no.
        parametrization: ``"per-layer"``: criterion, scope and rule, and one independent
            sparsity per layer (or one for the global scope). ``"allocation"``: a target
            sparsity (searched on a log-density scale within ``sparsity``), a base allocation
            from ``allocations`` and one offset per layer that moves its density by up to
            ``OFFSET_FACTOR`` either way; the target is always hit exactly.
        allocations: Names of registered allocations (see :mod:`autoprune.pruning.allocation`) the
            ``allocation`` parametrization starts from.
        schedules: Any of ``"oneshot"``, ``"gradual"``, ``"gradual-regrow"`` (see
            :mod:`autoprune.pruning.schedule`); searched as a categorical when there are several.
        quantizations: Any of ``"none"``, ``"int8-dynamic"``, ``"int8-static"``, applied after
            pruning and fine-tuning; searched as a categorical when there are several. A space
            with one other than ``"none"`` deploys every trial to ONNX Runtime (its accuracy,
            bytes and latency are those of the deployed model; see
            :mod:`autoprune.inference`).
        distill: Weights of distillation from the dense model during fine-tuning to choose
            from (each in [0, 1); 0 is off); searched as a categorical when there are several.
        lr_scale: ``(low, high)`` bounds of the factor on the task's fine-tune learning rate,
            searched on a log scale; ``(1, 1)`` keeps the task's rate and adds no param. By
            default half to 16 times the task's: at 95-98% sparsity on the digits tasks a
            2-epoch fine-tune recovered far more at 4-16 times the task's rate (see
            ``scripts/bench_recovery.py``). Warm starts keep the task's rate.
        rewinds: Any of ``False`` (the task's learning-rate schedule), ``True`` (a rewound,
            high-then-decaying one); searched as a categorical when there are both. The
            recovery settings apply to both granularities, always at the task's budget (see
            :mod:`autoprune.recovery`).

    Raises:
        SpecError: Naming the first bad argument and its value.
    """

    criteria: Sequence[str] = ("magnitude", "random", "sensitivity", "taylor", "wanda")
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
    parametrization: str = "allocation"
    allocations: Sequence[str] = ("lamp", "erk", "global", "uniform")
    schedules: Sequence[str] = ("oneshot", "gradual")
    quantizations: Sequence[str] = ("none",)
    distill: Sequence[float] = (0.0,)
    lr_scale: tuple[float, float] = (0.5, 16.0)
    rewinds: Sequence[bool] = (False,)

    def __post_init__(self) -> None:
        PARAMETRIZATIONS.get(self.parametrization)
        if isinstance(self.allocations, str) or not self.allocations:
            raise SpecError(f"allocations must be a non-empty list, got {self.allocations!r}")
        for name in self.allocations:
            get_allocation(name)
        object.__setattr__(self, "allocations", tuple(self.allocations))
        for field, known in (
            ("criteria", CRITERIA),
            ("scopes", SCOPES),
            ("rules", RULES),
            ("granularities", GRANULARITIES),
            ("channel_criteria", CRITERIA),
            ("schedules", SCHEDULES),
            ("quantizations", QUANTIZATIONS),
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
        self._check_recovery()
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

    def _check_recovery(self) -> None:
        distill, rewinds = check_recovery(self.distill, self.rewinds)
        low, high = _bounds("lr_scale", self.lr_scale)
        if not 0.0 < low <= high <= MAX_LR_SCALE:
            raise SpecError(
                f"lr_scale bounds must satisfy 0 < low <= high <= {MAX_LR_SCALE:g}, "
                f"got {[low, high]}"
            )
        object.__setattr__(self, "distill", distill)
        object.__setattr__(self, "lr_scale", (low, high))
        object.__setattr__(self, "rewinds", rewinds)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        return from_dict(cls, data, "search-space key")

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> SearchSpace:
        """The space a study stored (all its fields): one stored before the recovery
        settings searched none, whatever the defaults are now, so that it replays."""
        return cls.from_dict({**RECOVERY_BEFORE, **data})


def suggest_policy(
    trial: optuna.trial.BaseTrial,
    space: SearchSpace,
    layers: Sequence[str],
    groups: Sequence[str] = (),
    blocks: Sequence[str] = (),
    *,
    model: nn.Module | None = None,
) -> Policy:
    """Draw a policy for ``layers`` (unstructured) or channel ``groups`` (structured, see
    :func:`autoprune.pruning.structured.channel_groups`) from ``trial``; structured trials may
    remove any of the residual ``blocks``.

    Works on a live ``Trial`` (sampling) and on a ``FrozenTrial`` (replaying its params), so
    any finished trial's policy can be rebuilt from ``trial.params``.

    Args:
        model: The dense model; the ``allocation`` parametrization allocates by its weights.
    """
    granularity = space.granularities[0]
    if len(space.granularities) > 1:
        granularity = trial.suggest_categorical("granularity", space.granularities)
    if granularity == "structured":
        policy = _quantized(trial, space, _structured(trial, space, groups, blocks))
        return _recovered(trial, space, policy)
    policy = PARAMETRIZATIONS[space.parametrization](trial, space, layers, model)
    schedule = space.schedules[0]
    if len(space.schedules) > 1:  # no param otherwise: studies from before schedules replay
        schedule = trial.suggest_categorical("schedule", space.schedules)
    policy = _quantized(trial, space, dataclasses.replace(policy, schedule=schedule))
    return _recovered(trial, space, policy)


def _recovered(trial: optuna.trial.BaseTrial, space: SearchSpace, policy: Policy) -> Policy:
    settings = suggest_recovery(trial, space.distill, space.lr_scale, space.rewinds)
    return dataclasses.replace(policy, **settings)


def _quantized(trial: optuna.trial.BaseTrial, space: SearchSpace, policy: Policy) -> Policy:
    """``policy`` with its quantization drawn, and the runtime its numbers are measured in:
    ONNX Runtime for every trial of a space that may quantize, so all are measured alike."""
    quantization = space.quantizations[0]
    if len(space.quantizations) > 1:
        quantization = trial.suggest_categorical("quantization", space.quantizations)
    runtime = "onnxruntime" if any(q != "none" for q in space.quantizations) else "pytorch"
    return dataclasses.replace(policy, quantization=quantization, runtime=runtime)


def _per_layer(
    trial: optuna.trial.BaseTrial,
    space: SearchSpace,
    layers: Sequence[str],
    model: nn.Module | None,
) -> Policy:
    criterion = trial.suggest_categorical("criterion", space.criteria)
    scope, rule, alpha, sparsity = _ratios(trial, space, layers, "sparsity", space.sparsity)
    return Policy(sparsity=sparsity, criterion=criterion, scope=scope, rule=rule, alpha=alpha)


def _structured(
    trial: optuna.trial.BaseTrial,
    space: SearchSpace,
    groups: Sequence[str],
    blocks: Sequence[str],
) -> Policy:
    # Channel groups, per group or one global ratio; schedules and allocations are
    # unstructured-only (channels are removed once, before fine-tuning).
    criterion = trial.suggest_categorical("channel_criterion", space.channel_criteria)
    bounds = space.channel_sparsity
    scope, rule, alpha, sparsity = _ratios(trial, space, groups, "channels", bounds)
    removed = tuple(b for b in blocks if trial.suggest_categorical(f"remove:{b}", (False, True)))
    return Policy(
        sparsity=sparsity,
        criterion=criterion,
        scope=scope,
        rule=rule,
        alpha=alpha,
        granularity="structured",
        round_to=space.round_to,
        removed_blocks=removed,
    )


def _ratios(
    trial: optuna.trial.BaseTrial,
    space: SearchSpace,
    names: Sequence[str],
    prefix: str,
    bounds: tuple[float, float],
) -> tuple[str, str, float, dict[str, float]]:
    """Scope, rule, alpha and the per-name ratios (one per name, or one global)."""
    scope = trial.suggest_categorical("scope", space.scopes)
    rule = trial.suggest_categorical("rule", space.rules)
    low, high = bounds
    alpha = 1.0
    if rule == "mean":
        alpha = trial.suggest_float("alpha", *space.alpha, log=True)
        sparsity = dict.fromkeys(names, high)
    elif scope == "global":
        sparsity = dict.fromkeys(names, trial.suggest_float(prefix, low, high))
    else:
        sparsity = {name: trial.suggest_float(f"{prefix}:{name}", low, high) for name in names}
    return scope, rule, alpha, sparsity


def _allocation(
    trial: optuna.trial.BaseTrial,
    space: SearchSpace,
    layers: Sequence[str],
    model: nn.Module | None,
) -> Policy:
    if model is None:
        raise ValueError("the allocation parametrization needs the dense model")
    criterion = trial.suggest_categorical("criterion", space.criteria)
    allocation = trial.suggest_categorical("allocation", space.allocations)
    low, high = space.sparsity
    # Log-density: as many trials between 90% and 99% sparsity as between 0% and 90%. Fronts
    # are read at the highest sparsity allowed, so a sliver of the range below it maps onto
    # it: the sampler can return to the bound, not only the warm starts.
    drawn = trial.suggest_float("density", (1.0 - high) / BOUND_SLACK, 1.0 - low, log=True)
    density = max(drawn, 1.0 - high)
    offsets = {name: trial.suggest_float(f"offset:{name}", -1.0, 1.0) for name in layers}
    target = 1.0 - density
    modules = dict(model.named_modules())
    sizes = {name: modules[name].weight.numel() for name in layers}
    base = allocate(allocation, model, layers, target)
    return Policy(sparsity=reallocate(base, sizes, offsets, target), criterion=criterion)


def heuristic_params(
    space: SearchSpace,
    allocation: str,
    target: float,
    model: nn.Module,
    layers: Sequence[str],
    schedule: str = "oneshot",
    quantization: str = "none",
) -> dict[str, Any] | None:
    """The params under which ``suggest_policy`` draws the heuristic ``allocation`` at
    ``target`` with the magnitude criterion, ``schedule`` and ``quantization``, and the
    task's own recovery (for ``study.enqueue_trial``), or None if the space cannot express
    it. In the per-layer parametrization, sparsities beyond the space's bounds are clipped."""
    params = _heuristic_params(space, allocation, target, model, layers)
    if params is None or schedule not in space.schedules:
        return None
    if "unstructured" not in space.granularities:  # heuristics zero weights
        return None
    if quantization not in space.quantizations:
        return None
    recovery = task_recovery_params(space.distill, space.lr_scale, space.rewinds)
    if recovery is None:
        return None
    if len(space.granularities) > 1:
        params |= {"granularity": "unstructured"}
    params |= {"schedule": schedule} if len(space.schedules) > 1 else {}
    return params | _quantization_param(space, quantization) | recovery


def _quantization_param(space: SearchSpace, quantization: str) -> dict[str, Any]:
    return {"quantization": quantization} if len(space.quantizations) > 1 else {}


def _heuristic_params(
    space: SearchSpace, allocation: str, target: float, model: nn.Module, layers: Sequence[str]
) -> dict[str, Any] | None:
    low, high = space.sparsity
    if "magnitude" not in space.criteria or not low <= target <= high:
        return None
    if space.parametrization == "allocation":
        if allocation not in space.allocations:
            return None
        offsets = {f"offset:{name}": 0.0 for name in layers}
        base = {"criterion": "magnitude", "allocation": allocation, "density": 1.0 - target}
        return base | offsets
    if "ratio" not in space.rules:
        return None
    params: dict[str, Any] = {"criterion": "magnitude", "rule": "ratio"}
    if allocation == "global" and "global" in space.scopes:
        return params | {"scope": "global", "sparsity": target}
    if "layer" not in space.scopes:
        return None
    sparsity = allocate(allocation, model, layers, target)
    clipped = {f"sparsity:{k}": min(max(v, low), high) for k, v in sparsity.items()}
    return params | {"scope": "layer"} | clipped


def structured_heuristic_params(
    space: SearchSpace,
    ratio: float,
    groups: Sequence[str],
    blocks: Sequence[str] = (),
    *,
    remove_blocks: bool = False,
    quantization: str = "none",
) -> dict[str, Any] | None:
    """The params under which ``suggest_policy`` draws L1 channel pruning at ``ratio`` (for
    ``study.enqueue_trial``), or None if the space cannot express it.

    With the ``layer`` scope every channel group loses the fraction ``ratio`` of its channels
    (uniform L1); a space with the ``global`` scope only gets one L1 ranking over all groups
    that removes ``ratio`` of the channels in all (global L1). ``remove_blocks`` removes every
    one of the removable ``blocks`` as well (None if there are none); otherwise none is removed.

    None when the space has no structured granularity, no ``l1`` channel criterion or no
    ``ratio`` rule, ``ratio`` is outside its ``channel_sparsity`` bounds, there is no group,
    or ``quantization`` (applied after pruning) is not among the space's, or the space cannot
    fine-tune with the task's own recovery (no distillation, its rate and schedule).
    """
    low, high = space.channel_sparsity
    if (
        "structured" not in space.granularities
        or "l1" not in space.channel_criteria
        or "ratio" not in space.rules
        or not low <= ratio <= high
        or not groups
        or (remove_blocks and not blocks)
        or quantization not in space.quantizations
    ):
        return None
    recovery = task_recovery_params(space.distill, space.lr_scale, space.rewinds)
    if recovery is None:
        return None
    params: dict[str, Any] = {"channel_criterion": "l1", "rule": "ratio"}
    if len(space.granularities) > 1:
        params["granularity"] = "structured"
    if "layer" in space.scopes:
        params |= {"scope": "layer"} | {f"channels:{g}": ratio for g in groups}
    else:
        params |= {"scope": "global", "channels": ratio}
    params |= {f"remove:{b}": remove_blocks for b in blocks}
    return params | _quantization_param(space, quantization) | recovery


# What a stored space without recovery keys searched: the task's own recipe.
RECOVERY_BEFORE: dict[str, Any] = {"distill": [0.0], "lr_scale": [1.0, 1.0], "rewinds": [False]}
# Densities down to the bound's divided by this are drawn, and clipped to the bound.
BOUND_SLACK = 1.25

Parametrization = Callable[
    [optuna.trial.BaseTrial, SearchSpace, Sequence[str], "nn.Module | None"], Policy
]
PARAMETRIZATIONS: Registry[Parametrization] = Registry(
    "parametrization", {"per-layer": _per_layer, "allocation": _allocation}
)


def _bounds(name: str, value: Any) -> tuple[float, float]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise SpecError(f"{name} must be a [low, high] pair of numbers, got {value!r}")
    return float(value[0]), float(value[1])
