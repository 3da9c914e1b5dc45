"""Time to build the HTML dashboard of a study of many trials, split by phase.

Builds a synthetic study shaped like an autoprune study of digits-cnn (the same params,
distributions, user attrs and study attrs that ``autoprune search`` writes; values drawn so that
the front holds a few dozen trials), in a temporary SQLite file by default, then times
``autoprune report``'s page build: reading the trials, computing the data, drawing the
figures, rendering the HTML. The rows of the data and figure phases are the functions the
dashboard calls, each inclusive of what it calls; ``study.best_trials`` is counted and timed
wherever it is called. The build is repeated on a freshly loaded study; the table shows the
fastest run of each row.

    python scripts/bench_report.py [--trials 1000] [--storage memory] [--repeat 3] [--out x.html]

Run it on two checkouts (``PYTHONPATH=<checkout>``) with ``--out``: the same seed gives the
same study, so the two pages must be byte-identical.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import random
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from autoprune.report import page as dashboard
from autoprune.study.loading import load_study
from autoprune.study.sensitivity import SENSITIVITY_ATTR
from autoprune.study.setup import Recipe, StudySetup, write_setup
from autoprune.study.space import SearchSpace

LAYERS = ("features.0", "features.2", "classifier.1", "classifier.3")
SIZES = (144, 4608, 32768, 640)  # digits-cnn's prunable weights per layer
TOTAL = sum(SIZES)
CRITERIA = ("magnitude", "random", "sensitivity", "taylor")
EPOCHS, STEPS = 2, 4  # train-loss points per epoch, as digits-cnn records them
START = datetime.datetime(2024, 1, 1, 12, 0, 0)
# Functions of autoprune.report.page timed when the dashboard has them (inclusive times).
DATA = (
    "trials_frame",
    "pareto_front",
    "front_share",
    "param_importances",
    "trial_details",
    "hypervolume_history",
    "states_over_time",
    "sensitivity_frame",
    "_initial",
)
FIGURES = (
    "pareto_figure",
    "hypervolume_figure",
    "states_figure",
    "share_figure",
    "importance_figure",
    "sensitivity_figure",
    "loss_curves_figure",
)


def synthetic_trial(rng: random.Random, number: int) -> optuna.trial.FrozenTrial:
    """One trial as ``autoprune search`` records it on digits-cnn (per-layer parametrization,
    one-shot schedule); accuracy falls off as density drops, with noise."""
    criterion, scope, rule = rng.choice(CRITERIA), rng.choice(("layer", "global")), "ratio"
    rule = rng.choice(("ratio", "mean"))
    params: dict[str, Any] = {"criterion": criterion, "scope": scope, "rule": rule}
    dists: dict[str, Any] = {
        "criterion": CategoricalDistribution(CRITERIA),
        "scope": CategoricalDistribution(("layer", "global")),
        "rule": CategoricalDistribution(("ratio", "mean")),
    }
    alpha = 1.0
    if rule == "mean":
        alpha = params["alpha"] = rng.uniform(0.25, 4.0)
        dists["alpha"] = FloatDistribution(0.25, 4.0, log=True)
        sparsity = dict.fromkeys(LAYERS, 0.98)
    elif scope == "global":
        params["sparsity"] = rng.uniform(0.0, 0.98)
        dists["sparsity"] = FloatDistribution(0.0, 0.98)
        sparsity = dict.fromkeys(LAYERS, params["sparsity"])
    else:
        for layer in LAYERS:
            params[f"sparsity:{layer}"] = rng.uniform(0.0, 0.98)
            dists[f"sparsity:{layer}"] = FloatDistribution(0.0, 0.98)
        sparsity = {layer: params[f"sparsity:{layer}"] for layer in LAYERS}
    achieved = {
        layer: min(0.999, max(0.0, s * (alpha if rule == "mean" else 1.0) ** -0.1))
        for layer, s in sparsity.items()
    }
    nonzero = round(sum(n * (1 - achieved[k]) for k, n in zip(LAYERS, SIZES, strict=True)))
    density = nonzero / TOTAL
    accuracy = max(0.05, 0.99 - 0.02 / max(density, 0.01) ** 0.8 * rng.uniform(0.2, 1.0))
    train = [[(i + 1) / STEPS, 2.3 - 0.1 * i + rng.random() * 0.05] for i in range(EPOCHS * STEPS)]
    val = [[float(e), 2.3 - 0.2 * e + rng.random() * 0.05] for e in range(EPOCHS + 1)]
    policy = {"sparsity": sparsity, "criterion": criterion, "scope": scope, "rule": rule}
    trial = create_trial(
        values=[accuracy, float(nonzero)],
        params=params,
        distributions=dists,
        user_attrs={
            "policy": {**policy, "alpha": alpha, "schedule": "oneshot"},
            "seed": number,
            "density": density,
            "test_accuracy": accuracy - rng.uniform(0.0, 0.02),
            "layer_sparsity": achieved,
            "history": {"train": train, "val": val},
            "timings": {"scoring": 5e-4, "masking": 2e-3, "finetuning": 0.1, "evaluation": 7e-3},
        },
    )
    trial.datetime_start = START + datetime.timedelta(seconds=10 * number)
    trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=8)
    return trial


def make_study(n: int, storage: str | None, seed: int) -> optuna.Study:
    """A study of ``n`` trials: complete ones, and every 50th failed as a diverged one is."""
    study = optuna.create_study(
        storage=storage, study_name="bench", directions=["maximize", "minimize"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["accuracy", "nonzero_params"])
    dense = {"accuracy": 0.9916, "test_accuracy": 0.9833, "nonzero_params": float(TOTAL)}
    setup = StudySetup(
        task="digits-cnn",
        model="0" * 16,
        finetune=Recipe(epochs=2, lr=1e-3, batch_size=32, calibration_batches=4),
        layers=tuple(LAYERS),
        space=SearchSpace(),
        objectives=("accuracy", "nonzero_params"),
        latency=None,
        seed=0,
        dense={**dense, "total_params": float(TOTAL)},
    )
    write_setup(study, setup)
    curves = {layer: [[s / 10, 0.99 - 0.05 * s * s / 100] for s in range(10)] for layer in LAYERS}
    study.set_user_attr(SENSITIVITY_ATTR, curves)
    rng = random.Random(seed)
    trials = []
    for number in range(n):
        if number % 50 == 49:
            failed = create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "nan loss"})
            failed.datetime_start = START + datetime.timedelta(seconds=10 * number)
            failed.datetime_complete = failed.datetime_start + datetime.timedelta(seconds=1)
            trials.append(failed)
        else:
            trials.append(synthetic_trial(rng, number))
    study.add_trials(trials)
    return study


class Clock:
    """Inclusive seconds and call counts per label, one record per page build."""

    def __init__(self) -> None:
        self.runs: list[dict[str, list[float]]] = []  # label -> [seconds, calls]

    def new_run(self) -> None:
        self.runs.append(defaultdict(lambda: [0.0, 0]))

    def add(self, label: str, seconds: float) -> None:
        self.runs[-1][label][0] += seconds
        self.runs[-1][label][1] += 1

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start)

        return timed


def instrument(clock: Clock) -> None:
    """Wrap the dashboard's steps, the HTML writers and ``Study.best_trials``."""
    for name in (*DATA, *FIGURES, "dashboard_data", "dashboard_figures", "render"):
        if hasattr(dashboard, name):
            setattr(dashboard, name, clock.wrap(getattr(dashboard, name), name))
    go.Figure.to_html = clock.wrap(go.Figure.to_html, "Figure.to_html")  # type: ignore[method-assign]
    pd.DataFrame.to_html = clock.wrap(pd.DataFrame.to_html, "DataFrame.to_html")  # type: ignore[method-assign]
    best = optuna.Study.best_trials.fget  # type: ignore[attr-defined]
    optuna.Study.best_trials = property(clock.wrap(best, "Study.best_trials"))  # type: ignore[assignment, method-assign, arg-type]


def build(study: optuna.Study, out: Path, clock: Clock) -> None:
    """What ``autoprune report`` does once the study is loaded."""
    clock.new_run()
    start = time.perf_counter()
    study.get_trials(deepcopy=False)  # the one read of all trials (cached from here on)
    clock.add("read trials", time.perf_counter() - start)
    start = time.perf_counter()
    dashboard.write_report(study, out)
    clock.add("write_report", time.perf_counter() - start)


def table(clock: Clock) -> list[tuple[str, float, float, int]]:
    """(label, first build ms, fastest later build ms, calls per build) in page order."""
    labels = ["read trials", "write_report", "dashboard_data", *DATA, "dashboard_figures"]
    labels += [*FIGURES, "render", "Figure.to_html", "DataFrame.to_html", "Study.best_trials"]
    first, later = clock.runs[0], clock.runs[1:] or clock.runs[:1]
    rows = []
    for label in labels:
        if label in first:
            fastest = min(run[label][0] for run in later)
            rows.append((label, 1e3 * first[label][0], 1e3 * fastest, int(first[label][1])))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000, help="trials (default: 1000)")
    parser.add_argument(
        "--storage", help="'memory' or a URL (default: a SQLite file in a temp dir)"
    )
    parser.add_argument("--repeat", type=int, default=4, help="page builds (default: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="keep the page here (default: temp dir)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.storage or f"sqlite:///{tmp}/bench.db"
        made = make_study(args.trials, None if url == "memory" else url, args.seed)
        out = args.out or Path(tmp) / "report.html"
        front = len(made.best_trials)
        complete = len(made.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        where = "memory" if url == "memory" else args.storage or "sqlite (temp file)"
        clock = Clock()
        instrument(clock)
        for _ in range(args.repeat):
            # A fresh load, as each `autoprune report` is: nothing cached from the last build.
            build(made if url == "memory" else load_study(url, "bench"), out, clock)
    print(f"{args.trials} trials ({complete} complete, {front} on the front), {where}")
    print("ms; the first build pays for plotly's first figures, as `autoprune report` does;")
    print(f"later: the fastest of builds 2-{args.repeat} (as `--watch` rebuilds)")
    print("rows are inclusive of what they call\n")
    print(f"{'step':<24}{'first':>9}{'later':>9}{'calls':>7}")
    for label, cold, warm, calls in table(clock):
        indent = "" if label in ("read trials", "write_report") else "  "
        indent += "  " if label in (*DATA, *FIGURES) else ""
        print(f"{indent + label:<24}{cold:9.1f}{warm:9.1f}{calls:7d}")
    totals = [r["read trials"][0] + r["write_report"][0] for r in clock.runs]
    later = min(totals[1:] or totals)
    print(f"{'read + build':<24}{1e3 * totals[0]:9.1f}{1e3 * later:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
