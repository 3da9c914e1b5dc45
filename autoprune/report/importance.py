"""Optuna's parameter importances for the dashboard: an evaluator and a sample that fit a
study of any size, and a time budget.

Measured on a digits-mlp study (6 params, 2 objectives; CPU seconds per objective, this
2-core machine; ``scripts/bench_scale.py`` builds the study):

| complete trials | fANOVA (seed 0) | PED-ANOVA |
|---:|---:|---:|
| 5 | 0.15 | - |
| 40-60 | 0.45 | - |
| 99 | 0.9 | - |
| 300 | 1.9-2.6 | 0.015 |
| 1,000 | 14-18 | 0.04 |
| 9,900 | (minutes) | 0.35 |

fANOVA grows faster than linearly (a 1,500-trial study spent 118 s in it); PED-ANOVA, Optuna's
default, compares the best 10 % of the trials with all of them, which in a study of a few
dozen trials is one or two trials, and it then credits one parameter with everything. So:
fANOVA below ``PED_ANOVA_FROM`` complete trials, where its best 10 % would be under 10 trials;
from there PED-ANOVA on at most ``SAMPLE`` trials spread evenly over the study (0.04 s per
objective). Importances that would take longer than a budget of CPU seconds (CPU, not wall
time: a machine busy with other work does not skip them) are skipped, with a note.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
import pandas as pd
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from autoprune.study import _optuna

logger = logging.getLogger(__name__)

COLUMNS = ["objective", "param", "importance"]
# Fewer complete trials than this give importances that mean nothing.
MIN_TRIALS = 4
PED_ANOVA_FROM = 100
SAMPLE = 1000
# CPU seconds the page may spend on importances (all objectives of one study).
BUDGET = 3.0
# CPU seconds per objective: (fixed, per trial), from the measurements above, to tell
# before starting whether the budget suffices.
COST = {"fanova": (0.15, 7.5e-3), "ped-anova": (0.01, 4e-5)}


def choose(n_complete: int) -> tuple[str, int]:
    """The evaluator's name and the number of trials it reads, for a study of
    ``n_complete`` complete trials."""
    if n_complete < PED_ANOVA_FROM:
        return "fanova", n_complete
    return "ped-anova", min(n_complete, SAMPLE)


def spread(trials: Sequence[FrozenTrial], n: int) -> list[FrozenTrial]:
    """``n`` of ``trials``, evenly spaced (all of them if there are no more)."""
    if len(trials) <= n:
        return list(trials)
    return [trials[i * len(trials) // n] for i in range(n)]


def param_importances(
    study: optuna.Study,
    complete: Sequence[FrozenTrial],
    names: Sequence[str],
    *,
    budget: float = BUDGET,
) -> tuple[pd.DataFrame, str]:
    """Importances of each param for each objective named in ``names``, from ``complete``
    (the study's complete trials with their params); ``(frame, "")``, or the frame of what
    was computed and why the rest is missing (too few trials, nothing varied, over the
    ``budget`` of seconds).

    Columns: ``objective``, ``param``, ``importance``.
    """
    if len(complete) < MIN_TRIALS:
        reason = f"{len(complete)} complete trials; importances need {MIN_TRIALS}"
        return pd.DataFrame(columns=COLUMNS), reason
    kind, n = choose(len(complete))
    fixed, per_trial = COST[kind]
    expected = (fixed + per_trial * n) * len(names)
    if expected > budget:
        return pd.DataFrame(columns=COLUMNS), _skipped(kind, n, expected, budget)
    view = _optuna.FixedStudy(study, spread(complete, n))  # the study, holding the sample
    _evaluator(kind)  # imports scikit-learn for fANOVA: once per process, not the budget's
    rows: list[dict[str, object]] = []
    started = time.process_time()
    for i, name in enumerate(names):
        if i and (time.process_time() - started) * (i + 1) / i > budget:
            spent = time.process_time() - started
            return _frame(rows), _skipped(kind, n, spent * len(names) / i, budget, names[i:])
        sign = -1.0 if study.directions[i] == StudyDirection.MAXIMIZE else 1.0
        try:
            with warnings.catch_warnings():  # "few trials": the reason says it
                warnings.simplefilter("ignore", UserWarning)
                found = _optuna.importance_package().get_param_importances(
                    view, evaluator=_evaluator(kind), target=_objective(i, sign)
                )
        except (ValueError, RuntimeError) as e:  # e.g. no parameter common to all trials
            return pd.DataFrame(columns=COLUMNS), f"importances unavailable: {e}"
        rows += [{"objective": name, "param": p, "importance": v} for p, v in found.items()]
    logger.debug("importances (%s, %d trials): %.2f s", kind, n, time.process_time() - started)
    reason = "" if rows else "no parameter was searched in every complete trial"
    return _frame(rows), reason


def _evaluator(kind: str) -> Any:
    package = _optuna.importance_package()  # scikit-learn only for fANOVA
    if kind == "fanova":
        return package.FanovaImportanceEvaluator(seed=0)
    return package.PedAnovaImportanceEvaluator()


def _frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


def _skipped(kind: str, n: int, seconds: float, budget: float, names: Sequence[str] = ()) -> str:
    which = f" of {', '.join(names)}" if names else ""
    return (
        f"importances{which} skipped: {kind} on {n} trials takes about {seconds:.1f} s "
        f"of CPU, over the page's budget of {budget:g} s"
    )


def _objective(index: int, sign: float) -> Callable[[FrozenTrial], float]:
    return lambda trial: sign * float(trial.values[index])
