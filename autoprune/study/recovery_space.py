"""The recovery settings of a search space (see :mod:`autoprune.recovery`): their checks, how a
trial draws them, and the params that pin the task's own in a warm start.

A setting adds an Optuna param only when the space offers a choice, so that studies from
before these settings replay alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from autoprune.errors import SpecError


def check_recovery(distill: object, rewinds: object) -> tuple[tuple[float, ...], tuple[bool, ...]]:
    """The space's distillation weights and rewind choices as tuples.

    Raises:
        SpecError: Naming the first bad value.
    """
    if isinstance(distill, (str, bytes)) or not isinstance(distill, Sequence) or not distill:
        raise SpecError(f"distill must be a non-empty list of weights, got {distill!r}")
    for weight in distill:
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not number or not 0.0 <= weight < 1.0:
            raise SpecError(f"distill weights must be numbers in [0, 1), got {weight!r}")
    if isinstance(rewinds, (str, bytes)) or not isinstance(rewinds, Sequence) or not rewinds:
        raise SpecError(f"rewinds must be a non-empty list of true/false, got {rewinds!r}")
    for rewind in rewinds:
        if not isinstance(rewind, bool):
            raise SpecError(f"rewinds must be true or false, got {rewind!r}")
    return tuple(float(w) for w in distill), tuple(rewinds)


def suggest_recovery(
    trial: optuna.trial.BaseTrial,
    distill: Sequence[float],
    lr_scale: tuple[float, float],
    rewinds: Sequence[bool],
) -> dict[str, Any]:
    """The policy fields ``distill``, ``lr_scale`` and ``rewind`` drawn from ``trial`` (the
    learning-rate factor on a log scale)."""
    weight = distill[0]
    if len(distill) > 1:
        weight = trial.suggest_categorical("distill", distill)
    low, high = lr_scale
    scale = low if low == high else trial.suggest_float("lr_scale", low, high, log=True)
    rewind = rewinds[0]
    if len(rewinds) > 1:
        rewind = trial.suggest_categorical("rewind", rewinds)
    return {"distill": weight, "lr_scale": scale, "rewind": rewind}


def task_recovery_params(
    distill: Sequence[float], lr_scale: tuple[float, float], rewinds: Sequence[bool]
) -> dict[str, Any] | None:
    """The params that pin the task's own recovery (no distillation, its learning rate and
    schedule) where the space searches them, so that a heuristic warm start is the heuristic
    as it always was; None if the space cannot express that."""
    low, high = lr_scale
    if 0.0 not in distill or False not in rewinds or not low <= 1.0 <= high:
        return None
    params: dict[str, Any] = {}
    if len(distill) > 1:
        params["distill"] = 0.0
    if low < high:
        params["lr_scale"] = 1.0
    if len(rewinds) > 1:
        params["rewind"] = False
    return params
