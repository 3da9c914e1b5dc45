"""The parts of ``bench_search.py`` that do not print: front metrics, compute accounting,
recovery variants of the heuristic rows, the ablation's option switches, and the third task.

Options that other branches of issue 14 add (Policy fields ``distill``, ``lr_scale``,
``rewind``; criteria ``wanda`` and ``fisher``; WarmStart's extreme allocations; the study's
multi-fidelity setting) are looked up in the installed code, never assumed: what is absent is
skipped with a note saying so, and lights up once it lands.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from _search_targets import THRESHOLDS
from optuna._hypervolume import compute_hypervolume
from optuna.trial import TrialState
from torch import Tensor, nn

from autoprune.pruning.criteria import CRITERIA
from autoprune.pruning.masks import prunable_layers
from autoprune.pruning.policy import Policy
from autoprune.run.searching import search
from autoprune.run.worker import run_worker
from autoprune.spec import StudySpec
from autoprune.study.space import SearchSpace
from autoprune.study.study import open_study
from autoprune.study.warm_start import DEFAULT_WARM_START
from autoprune.task import Task
from autoprune.tasks import load_task
from autoprune.tasks.digits import _digits_task
from autoprune.train import steps_per_epoch, total_steps
from autoprune.trial import PruneResult, baseline, trial_seed

CHANCE = 0.1  # the hypervolume's reference accuracy (10 classes)
Point = dict[str, float]  # val, test, sparsity
# Recovery variants of every heuristic row by default: Policy-field overrides given to
# trial.baseline (0.5 is the distillation weight the example uses).
RECOVERY = ("distill=0.5", "rewind=true", "distill=0.5,rewind=true")
NEW_CRITERIA = ("wanda", "fisher")
FIDELITY_ARGS = ("fidelity", "multi_fidelity", "screen")  # autoprune.search's, if any


# --- front metrics ---------------------------------------------------------------------------


def best_at(points: list[Point], threshold: float) -> float:
    """Test accuracy of the best-validation point with sparsity >= threshold (nan if none).
    Ties go to the sparser point."""
    eligible = [p for p in points if p["sparsity"] >= threshold - 1e-9]
    if not eligible:
        return math.nan
    return max(eligible, key=lambda p: (p["val"], p["sparsity"]))["test"]


def val_front(points: list[Point]) -> list[Point]:
    """Points no other point beats on validation accuracy and sparsity together."""
    return [
        p
        for p in points
        if not any(
            q["val"] >= p["val"]
            and q["sparsity"] >= p["sparsity"]
            and (q["val"] > p["val"] or q["sparsity"] > p["sparsity"])
            for q in points
        )
    ]


def hypervolume(points: list[Point]) -> float:
    """Of the validation front, in (test accuracy, log10 density), both taken as losses."""
    losses = [
        [-p["test"], math.log10(max(1.0 - p["sparsity"], 1e-12))]
        for p in val_front(points)
        if p["test"] > CHANCE
    ]
    if not losses:
        return 0.0
    return float(compute_hypervolume(np.array(losses), np.array([-CHANCE, 0.0])))


def study_front(study: optuna.Study) -> list[Point]:
    """The validation front of the study's complete FULL-fidelity trials (a screened trial,
    user attr ``fidelity`` < 1, never enters it). Without fidelity attrs these are exactly the
    points of ``study.best_trials`` (accuracy and nonzero weights order as val and sparsity)."""
    points = [
        {
            "val": t.values[0],
            "test": t.user_attrs["test_accuracy"],
            "sparsity": 1.0 - t.user_attrs["density"],
        }
        for t in study.trials
        if t.state == TrialState.COMPLETE and t.user_attrs.get("fidelity", 1.0) >= 1.0
    ]
    return val_front(points)


# --- compute ---------------------------------------------------------------------------------


def full_epochs(task: Task) -> float:
    """Fine-tune epochs of one full trial (the task's budget, steps counted as passes)."""
    return total_steps(task) / steps_per_epoch(task)


def result_epochs(result: PruneResult) -> float:
    """Epochs a fine-tune ran: the last point of its val curve (fractional passes)."""
    val = result.history.get("val", [])
    return float(val[-1][0]) if val else 0.0


def study_epochs(study: optuna.Study, task: Task) -> float:
    """Fine-tune epochs the study spent: each trial's user attr ``epochs_spent`` when the study
    records it (multi-fidelity), else the end of its val curve, else the epoch it was stopped
    at, else (a failed trial) a full trial's."""
    total = 0.0
    for t in study.trials:
        attrs = t.user_attrs
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if "epochs_spent" in attrs:
            total += float(attrs["epochs_spent"])
        elif t.state == TrialState.COMPLETE and attrs.get("history", {}).get("val"):
            total += float(attrs["history"]["val"][-1][0])
        elif "stopped_at" in attrs:
            total += float(attrs["stopped_at"][0])
        else:
            total += full_epochs(task)
    return total


# --- one row: a heuristic sweep, or a study -----------------------------------------------


@dataclasses.dataclass
class Run:
    """One row of one seed: the front's points, seconds, fine-tune epochs, stopped trials."""

    points: list[Point]
    wall: float
    epochs: float
    stopped: int = 0

    def row(self) -> dict[str, float]:
        row = {f"best@{t}": best_at(self.points, t) for t in THRESHOLDS}
        return row | {
            "hv": hypervolume(self.points),
            "epochs": self.epochs,
            "wall": self.wall,
            "stopped": self.stopped,
        }


def sweep(
    task: Any,
    allocation: str,
    seed: int,
    sparsities: tuple[float, ...],
    schedule: str = "oneshot",
    recovery: dict[str, Any] | None = None,
) -> Run:
    """The heuristic at each sparsity, fine-tuned as a study's trial would be. Every row gets
    the same seeds, so that rows differ by their schedule and recovery alone."""
    start = time.perf_counter()
    layers = prunable_layers(task.model)
    points, epochs = [], 0.0
    for i, target in enumerate(sparsities):
        result = baseline(
            task,
            allocation,
            target,
            seed=trial_seed(seed, i),
            layers=layers,
            schedule=schedule,
            **(recovery or {}),
        )
        m = result.metrics
        points.append(
            {"val": m["accuracy"], "test": m["test_accuracy"], "sparsity": m["sparsity"]}
        )
        epochs += result_epochs(result)
    return Run(points, time.perf_counter() - start, epochs)


def study_run(task: Any, spec: StudySpec | None, seed: int, trials: int, **kwargs: Any) -> Run:
    """An in-memory study. ``spec`` None: through the Python API with its defaults but
    ``kwargs`` (``autoprune.search(task, n_trials, seed, **kwargs)``); else through the spec's
    path (``StudySpec.setup``, as ``autoprune search SPEC``)."""
    start = time.perf_counter()
    if spec is None:
        study = search(task, n_trials=trials, seed=seed, **kwargs)
    else:
        spec = dataclasses.replace(spec, task=task.name, trials=trials, seed=seed)
        study = open_study(spec.setup(task), task, storage=None, study_name=None)
        run_worker(study, task, target=trials)
    stopped = sum(t.state == TrialState.PRUNED for t in study.trials)
    return Run(study_front(study), time.perf_counter() - start, study_epochs(study, task), stopped)


# --- recovery variants of the heuristic rows -------------------------------------------------


def parse_variant(text: str) -> dict[str, Any]:
    """``"distill=0.5,rewind=true"`` -> ``{"distill": 0.5, "rewind": True}``.

    Raises:
        ValueError: On an item that is not ``field=value``.
    """
    fields: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"recovery variant items are field=value, got {item!r} in {text!r}")
        value = value.strip().lower()
        if value in ("true", "false"):
            fields[key.strip()] = value == "true"
        else:
            try:
                fields[key.strip()] = float(value)
            except ValueError:
                raise ValueError(
                    f"{key.strip()}={value!r} is not a number or true/false"
                ) from None
    return fields


def variant_label(fields: dict[str, Any]) -> str:
    """A row suffix: ``distill=0.5+rewind`` (a true flag by its name alone)."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, bool):
            parts.append(key if value else f"no-{key}")
        else:
            parts.append(f"{key}={value:g}")
    return "+".join(parts)


def missing_fields(fields: dict[str, Any]) -> list[str]:
    """The variant's fields that the installed Policy or ``trial.baseline`` lacks."""
    policy = {f.name for f in dataclasses.fields(Policy)}
    accepted = inspect.signature(baseline).parameters
    return [k for k in fields if k not in policy or k not in accepted]


# --- the ablation: each new option of the default study off in turn --------------------------


def _space_off(changes: dict[str, Any], what: str) -> dict[str, Any] | str:
    space = SearchSpace()
    present = {k: v for k, v in changes.items() if hasattr(space, k)}
    if not present:
        return f"SearchSpace has no {'/'.join(changes)} field: {what} is not installed"
    if all(tuple(getattr(space, k)) == tuple(v) for k, v in present.items()):
        return f"{what} is off in the default SearchSpace already"
    return {"space": dataclasses.replace(space, **present)}


def _criteria_off() -> dict[str, Any] | str:
    installed = [c for c in NEW_CRITERIA if c in CRITERIA]
    if not installed:
        return f"criteria {'/'.join(NEW_CRITERIA)} are not installed"
    space = SearchSpace()
    changes: dict[str, Any] = {
        key: tuple(c for c in getattr(space, key) if c not in installed)
        for key in ("criteria", "channel_criteria")
    }
    if all(changes[k] == tuple(getattr(space, k)) for k in changes):
        return f"criteria {'/'.join(installed)} are not in the default SearchSpace"
    return {"space": dataclasses.replace(space, **changes)}


def _extreme_warm_off() -> dict[str, Any] | str:
    warm = DEFAULT_WARM_START
    fields = {
        f.name: ()
        for f in dataclasses.fields(warm)
        if f.name.startswith("extreme") and isinstance(getattr(warm, f.name), (tuple, list))
    }
    if not fields:
        return "WarmStart has no extreme_* allocations: extreme warm starts are not installed"
    if all(not getattr(warm, k) for k in fields):
        return "extreme warm starts are off in the default WarmStart already"
    return {"warm_start": dataclasses.replace(warm, **fields)}


def _fidelity_off() -> dict[str, Any] | str:
    params = inspect.signature(search).parameters
    name = next((n for n in FIDELITY_ARGS if n in params), None)
    if name is None:
        return "autoprune.search has no multi-fidelity argument: it is not installed"
    if params[name].default in (None, False, 1.0):
        return f"multi-fidelity is off by default ({name}={params[name].default!r})"
    return {name: None}


def ablations() -> list[tuple[str, dict[str, Any] | str]]:
    """``(row suffix, autoprune.search keyword arguments or why the row is skipped)`` per new
    option, each turned off alone in the API study's defaults."""
    return [
        ("-distill", _space_off({"distill": (0.0,)}, "distillation")),
        ("-lr/rewind", _space_off({"lr_scale": (1.0, 1.0), "rewinds": (False,)}, "lr/rewind")),
        ("-criteria", _criteria_off()),
        ("-extreme warm", _extreme_warm_off()),
        ("-fidelity", _fidelity_off()),
    ]


# --- the third task --------------------------------------------------------------------------


class DigitsAllConv(nn.Module):
    """Three 3x3 convolutions (16, 32, 64 channels; the last two with stride 2), global average
    pooling and one linear layer (about 24k weights, most in the last convolution): unlike
    digits-cnn, no wide linear layer holds most of the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def digits_allconv(*, seed: int = 0) -> Task:
    """A third architecture on the same digits, split and dense recipe (trained once per seed
    and cached as the built-in tasks are), never tuned for: it shows whether gains transfer."""
    return _digits_task("digits-allconv", DigitsAllConv, (1, 8, 8), seed)


LOCAL_TASKS = {"digits-allconv": digits_allconv}


def get_task(name: str, seed: int) -> Task:
    """A task of this benchmark, or any task ``autoprune.tasks.load_task`` builds."""
    if name in LOCAL_TASKS:
        return LOCAL_TASKS[name](seed=seed)
    return load_task(name, seed=seed)


def fine_tunes_per_seed(rows: int, sweep: Sequence[float], studies: Sequence[float]) -> float:
    """Full fine-tunes one seed of one task costs: every heuristic row's sweep, and each
    study's budget in full-trial equivalents."""
    return rows * len(sweep) + sum(studies)
