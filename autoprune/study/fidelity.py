"""Multi-fidelity trials: screen policies with a short fine-tune, promote the promising ones.

A study with a :class:`Fidelity` fine-tunes each *sampled* policy for a fraction ``screen`` of
the recipe's optimizer steps (a screened trial). When a screened trial completes, the worker
that ran it ranks the study's screened trials by non-dominated sorting of their values
(accuracy against size: "at their density") and enqueues the best ``promote`` fraction of
them, not yet promoted, with the same params: asynchronous successive halving (ASHA), built
on the study's own trials because Optuna's pruners refuse multi-objective studies. A
promotion is an ordinary WAITING trial (user attrs ``fidelity`` 1.0 and ``promoted_from``),
so any worker takes it and it survives a crash; its params replay the screened policy.

Only full-fidelity trials (warm starts, promotions, and trials of studies without fidelity)
are on the front (:func:`autoprune.study._optuna.pareto_front`), so ``pick``, export, early
stop, constraints, hypervolume and the report never see a screened trial; the sampler learns
from all of them.

This module imports no torch (``autoprune status`` reads fidelities); the objective shortens
a screened trial's fine-tune (:func:`autoprune.study.objective.screened_task`).

Two workers may enqueue the same promotion (each read the study before the other wrote):
the later-numbered copy is a duplicate, found when a worker takes it (:func:`duplicate_of`),
and fails at once as surplus, uncounted and unrun.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune._registry import from_dict, to_dict
from autoprune.errors import SpecError
from autoprune.study import _optuna

FIDELITY_ATTR = _optuna.FIDELITY_ATTR  # trial user attr: fraction of the full fine-tune
PROMOTED_ATTR = "promoted_from"  # trial user attr: the screened trial a promotion repeats
EPOCHS_ATTR = "epochs_spent"  # trial user attr: fine-tune epochs (steps / steps per epoch)
DUPLICATE = "duplicate promotion"  # how a duplicate's fail_reason starts


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """How a study screens and promotes (see the module doc).

    Args:
        screen: The fraction of the recipe's fine-tune steps a screened trial runs, in
            (0, 1); at least one step.
        promote: The fraction of screened trials promoted to the full fine-tune, in (0, 1].

    Raises:
        SpecError: If either is not a number in its range.
    """

    screen: float = 0.25
    promote: float = 0.34

    def __post_init__(self) -> None:
        for name, value, closed in (
            ("screen", self.screen, False),
            ("promote", self.promote, True),
        ):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not (0 < value < 1 or (closed and value == 1)):
                span = "(0, 1]" if closed else "(0, 1)"
                raise SpecError(f"fidelity {name} must be a number in {span}, got {value!r}")
            object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fidelity:
        return from_dict(cls, data, "fidelity key")


def trial_fidelity(trial: FrozenTrial) -> float:
    """The fraction of the full fine-tune ``trial`` runs (1.0 when it says nothing)."""
    return float(trial.user_attrs.get(FIDELITY_ATTR, 1.0))


def is_full(trial: FrozenTrial) -> bool:
    """Whether ``trial`` ran (or runs) the full fine-tune."""
    return trial_fidelity(trial) >= 1.0


def starting_fidelity(trial: optuna.Trial, fidelity: Fidelity) -> float:
    """The fidelity of a trial that starts: what it was enqueued with (promotions, retries),
    full for other enqueued trials (warm starts), else ``fidelity.screen`` (sampled)."""
    stored = trial.user_attrs.get(FIDELITY_ATTR)
    if stored is not None:
        return float(stored)
    return 1.0 if _optuna.is_enqueued(trial) else fidelity.screen


def duplicate_of(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> int | None:
    """The number of an earlier promotion of the same screened trial as ``trial`` (which
    then is a duplicate), else None. Retries of ``trial`` itself and duplicates that already
    failed do not count."""
    source = trial.user_attrs.get(PROMOTED_ATTR)
    if source is None:
        return None
    own = set(trial.system_attrs.get("retry_history", ()))
    own |= {trial.user_attrs["resumes"]} if "resumes" in trial.user_attrs else set()
    for other in trials:
        if other.number >= trial.number:
            break
        if (
            other.user_attrs.get(PROMOTED_ATTR) == source
            and other.number not in own
            and not str(other.user_attrs.get("fail_reason", "")).startswith(DUPLICATE)
        ):
            return other.number
    return None


def promotions(trials: Sequence[FrozenTrial], fidelity: Fidelity, directions: Any) -> list[int]:
    """Screened trials to promote now: of the complete screened trials, ranked by
    non-dominated sorting of their values (ties: better first objective, then lower number),
    the best ``floor(promote * n)`` minus the promotions made so far, among those not yet
    promoted. A pure function of the trials, so two workers reading the same study agree."""
    screened = [t for t in trials if t.state == TrialState.COMPLETE and not is_full(t)]
    promoted = {t.user_attrs[PROMOTED_ATTR] for t in trials if PROMOTED_ATTR in t.user_attrs}
    wanted = math.floor(fidelity.promote * len(screened) + 1e-9) - len(promoted)
    if wanted <= 0:
        return []
    signs = [-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in directions]
    losses = np.asarray([t.values for t in screened], dtype=float) * signs
    ranks = _optuna.non_domination_ranks(losses)
    order = sorted(range(len(screened)), key=lambda i: (ranks[i], losses[i][0], i))
    fresh = [screened[i].number for i in order if screened[i].number not in promoted]
    return fresh[:wanted]


class Promoter:
    """The callback that enqueues promotions after each screened trial (see the module doc)."""

    def __init__(self, fidelity: Fidelity):
        self.fidelity = fidelity

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE or is_full(trial):
            return
        trials = study.get_trials(deepcopy=False)
        for number in promotions(trials, self.fidelity, study.directions):
            enqueue_promotion(study, trials[number])


def enqueue_promotion(study: optuna.Study, screened: FrozenTrial) -> None:
    """Queue ``screened``'s params at full fidelity."""
    study.enqueue_trial(
        screened.params,
        user_attrs={FIDELITY_ATTR: 1.0, PROMOTED_ATTR: screened.number},
        skip_if_exists=False,
    )


def compute(trials: Sequence[FrozenTrial]) -> float:
    """Fine-tune compute of ``trials`` in full-trial equivalents (a screened one counts its
    fidelity)."""
    return round(sum(trial_fidelity(t) for t in trials), 9)
