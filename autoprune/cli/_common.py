"""What the commands share: argparse value types and arguments, and the text that describes
a study (trial counts, status, Pareto front)."""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from autoprune.run.status import StudyStatus
from autoprune.study.trials import trial_summaries

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_STORAGE = "sqlite:///autoprune.db"
_STATE_WORDS = {TrialState.PRUNED: "stopped early"}


def study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage", default=DEFAULT_STORAGE, help=f"database URL (default: {DEFAULT_STORAGE})"
    )
    p.add_argument("--study-name", help="needed when the storage holds several studies")


def create_in_existing_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--create-in-existing",
        action="store_true",
        help="add Optuna's tables to a database that holds another application's tables "
        "(refused without it)",
    )


# The longest interval a watch may sleep: a day (a longer one overflows the clock's sleep).
MAX_INTERVAL = 86_400.0


def positive_float(text: str) -> float:
    """An interval in seconds: > 0, at most a day."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_INTERVAL):
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds > 0 and <= {MAX_INTERVAL:.0f}, got {text!r}"
        )
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A sparsity, a distillation weight: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


class RegistryNames:
    """argparse ``choices``: the names of a registry, read when first needed (the
    registries of criteria and allocations live beside torch code, which a command that does
    not take the option never imports). Give the argument a ``metavar``: argparse lists
    choices in the usage line otherwise, at once."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def _names(self) -> list[str]:
        return list(getattr(importlib.import_module(self.module), self.name))

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def print_counts(study: optuna.Study) -> None:
    import pandas as pd

    # A PRUNED trial is one that autoprune.study.stopping stopped early: say so in our words.
    states = pd.Series(
        [_STATE_WORDS.get(t.state, t.state.name.lower()) for t in trial_summaries(study)]
    )
    counts = ", ".join(f"{n} {state}" for state, n in states.value_counts().items())
    print(f"study {study.study_name!r}: {len(states)} trials ({counts})")


def status_text(status: StudyStatus) -> str:
    states = ", ".join(f"{n} {word}" for word, n in status.states.items())
    target = f" of a target of {status.target}" if status.target else ""
    lines = [f"study {status.name!r}: {status.counted} trials{target} ({states})"]
    if status.compute is not None:
        of = f" of {status.target}" if status.target else ""
        lines.append(
            f"fidelity: {status.screened} screened, {status.full} full; "
            f"compute {status.compute:g}{of} full trials"
        )
    pace = status.trials_per_hour
    lines.append(
        "pace: "
        + (
            "no trial finished in the last hour"
            if pace is None
            else f"{pace:.1f} trials/hour over the last hour"
        )
    )
    hv = "" if status.hypervolume is None else f", hypervolume {status.hypervolume:.4f}"
    lines.append(f"Pareto front: {status.front_size} trials{hv}")
    for level, best in status.best_at_sparsity.items():
        text = "no trial" if best is None else f"{best[0]:.4f} (trial {best[1]})"
        lines.append(f"best val accuracy at sparsity >= {level:.0%}: {text}")
    lines.append(f"workers seen in the last 15 minutes: {len(status.workers)}")
    lines += [
        f"  {w.worker}: {w.trials} trials, {w.running} running, "
        f"last seen {w.last_seen_s:.0f} s ago"
        for w in status.workers
    ]
    for number, worker, seconds in status.long_running:
        lines.append(
            f"trial {number} has run suspiciously long: {seconds / 60:.1f} min on {worker}"
        )
    return "\n".join(lines)


def front_text(front: pd.DataFrame) -> str:
    if front.empty:
        return "the Pareto front is empty (no trial has completed)"
    shown = front.rename(columns=lambda c: c.replace("sparsity:", "s:"))
    return f"Pareto front ({len(front)} trials):\n" + shown.to_string(
        index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"
    )
