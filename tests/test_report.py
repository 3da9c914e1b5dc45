"""Report: the front table (checked against Optuna's own front), and the HTML page."""

from __future__ import annotations

import math
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import hand_setup
from optuna.trial import TrialState, create_trial

from autoprune import Task, pareto_front, search, write_report
from autoprune.report.data import COLUMNS, RECOVERY_DEFAULTS, trials_frame

LAYERS = ["features.0", "classifier.1", "classifier.3"]

# (accuracy, nonzero) of hand-made trials 0..7; the front is 0, 1, 3, 5 and 6 (a tie of 5).
VALUES = [
    (0.90, 100),  # 0 front
    (0.95, 200),  # 1 front
    (0.80, 150),  # 2 dominated by 0
    (0.99, 400),  # 3 front
    (0.95, 300),  # 4 dominated by 1
    (0.50, 10),  # 5 front
    (0.50, 10),  # 6 front: equal to 5, so neither dominates the other
    (0.99, 500),  # 7 dominated by 3
]
FRONT = [5, 6, 0, 1, 3]  # by nonzero, then trial number
TOTAL = 1000


def hand_made_trial(accuracy: float, nonzero: int, i: int) -> optuna.trial.FrozenTrial:
    rule = "mean" if i % 2 else "ratio"
    density = nonzero / TOTAL
    return create_trial(
        values=[accuracy, float(nonzero)],
        user_attrs={
            "policy": {
                "sparsity": dict.fromkeys(LAYERS, 0.9),
                "criterion": "magnitude",
                "scope": "layer" if i % 3 else "global",
                "rule": rule,
                "alpha": 1.0 + i,
            },
            "seed": i,
            "test_accuracy": accuracy - 0.01,
            "density": density,
            "sparsity": 1.0 - density,
            "total_params": float(TOTAL),
            "layer_sparsity": {name: 1.0 - density for name in LAYERS},
            "history": {"train": [[0.5, 1.0], [1.0, 0.5]], "val": [[0.0, 1.2], [1.0, 0.6]]},
        },
    )


@pytest.fixture
def hand_made() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="hand")
    hand_setup(study, accuracy=1.0)
    for i, (accuracy, nonzero) in enumerate(VALUES):
        study.add_trial(hand_made_trial(accuracy, nonzero, i))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "x"}))
    return study


@pytest.fixture(scope="module")
def searched(_trained_task: Task) -> optuna.Study:
    """A real (in-memory) study of the tiny task; search never modifies the shared model."""
    return search(_trained_task, n_trials=6, seed=1)


def dominates(a: pd.Series, b: pd.Series) -> bool:
    no_worse = a["accuracy"] >= b["accuracy"] and a["nonzero_params"] <= b["nonzero_params"]
    better = a["accuracy"] > b["accuracy"] or a["nonzero_params"] < b["nonzero_params"]
    return no_worse and better


def assert_front_properties(study: optuna.Study, front: pd.DataFrame) -> None:
    assert list(front.columns[: len(COLUMNS)]) == COLUMNS
    assert sorted(front["trial"]) == sorted(t.number for t in study.best_trials)
    assert front["nonzero_params"].is_monotonic_increasing
    rows = [row for _, row in front.iterrows()]
    for a in rows:
        for b in rows:
            assert not dominates(a, b), (a["trial"], b["trial"])
    # Every complete trial off the front is dominated by one on it.
    frame = trials_frame(study)
    for _, row in frame[~frame["on_front"]].iterrows():
        assert any(dominates(a, row) for a in rows), row["trial"]
    by_number = {t.number: t for t in study.trials}
    for row in rows:
        trial = by_number[row["trial"]]
        assert (row["accuracy"], row["nonzero_params"]) == tuple(trial.values)
        assert row["density"] == trial.user_attrs["density"]
        assert row["criterion"] == trial.user_attrs["policy"]["criterion"]


def test_front_of_hand_made_study(hand_made: optuna.Study) -> None:
    front = pareto_front(hand_made)
    assert list(front["trial"]) == FRONT
    assert list(front.columns) == COLUMNS + [f"sparsity:{name}" for name in LAYERS]
    assert_front_properties(hand_made, front)
    row = front.iloc[2]  # trial 0: ratio rule, so no alpha
    assert row["test_accuracy"] == pytest.approx(0.89)
    assert (row["scope"], row["rule"]) == ("global", "ratio")
    assert math.isnan(row["alpha"])
    assert front.iloc[0]["alpha"] == 6.0 and front.iloc[0]["rule"] == "mean"  # trial 5
    assert front.iloc[0]["sparsity:classifier.1"] == pytest.approx(0.99)
    assert front["nonzero_params"].dtype.kind == "i"


def test_trials_frame_marks_the_front(hand_made: optuna.Study) -> None:
    frame = trials_frame(hand_made)
    assert len(frame) == len(VALUES)  # the failed trial is left out
    assert list(frame.columns) == COLUMNS + [f"sparsity:{n}" for n in LAYERS] + ["on_front"]
    assert set(frame.loc[frame["on_front"], "trial"]) == set(FRONT)
    assert set(frame.loc[~frame["on_front"], "trial"]) == {2, 4, 7}
    assert frame["nonzero_params"].is_monotonic_increasing


@pytest.mark.slow
def test_front_of_a_real_search(searched: optuna.Study) -> None:
    front = pareto_front(searched)
    assert len(front) >= 1
    # The default space searches the fine-tune rate: its column follows the schedule's when a
    # front trial departs from the task's rate.
    recovery = [c for c in front.columns if c in RECOVERY_DEFAULTS]
    assert recovery in ([], ["lr_scale"])
    sparsities = [f"sparsity:{name}" for name in LAYERS]
    assert list(front.columns) == COLUMNS + recovery + sparsities
    assert_front_properties(searched, front)
    for _, row in front.iterrows():
        trial = searched.trials[row["trial"]]
        for name in LAYERS:
            assert row[f"sparsity:{name}"] == trial.user_attrs["layer_sparsity"][name]
        assert row["test_accuracy"] == trial.user_attrs["test_accuracy"]
        total = searched.user_attrs["autoprune"]["dense"]["total_params"]
        assert row["nonzero_params"] == round(row["density"] * total)
        assert row["sparsity"] == 1.0 - row["density"]


def test_empty_study() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    front = pareto_front(study)
    assert front.empty and list(front.columns) == COLUMNS
    frame = trials_frame(study)
    assert frame.empty and list(frame.columns) == [*COLUMNS, "on_front"]
    study.add_trial(create_trial(state=TrialState.FAIL))
    assert pareto_front(study).empty and trials_frame(study).empty


def check_page(path: Path, front: pd.DataFrame) -> str:
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: the plotly.js bundle is inline, nothing is fetched from the network.
    assert "plotly.js v" in page and len(page) > 1_000_000
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.IGNORECASE)
    assert page.count('class="plotly-graph-div"') == 6  # front, 4 panels, loss curves
    table = page[page.index("<h2>Pareto front</h2>") :]
    assert table.count("<tr") == 1 + len(front)  # header and one row per front trial
    for name in front.columns:
        assert f"<th>{name}</th>" in table
    return page


@pytest.mark.slow
def test_write_report(hand_made: optuna.Study, tmp_path: Path) -> None:
    out = write_report(hand_made, tmp_path / "r.html")
    assert out == tmp_path / "r.html"
    page = check_page(out, pareto_front(hand_made))
    assert "autoprune report: hand" in page
    assert f"{len(VALUES)} complete trials, {len(FRONT)} on the front" in page
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left


@pytest.mark.slow
def test_write_report_of_real_and_empty_studies(searched: optuna.Study, tmp_path: Path) -> None:
    check_page(write_report(searched, tmp_path / "real.html"), pareto_front(searched))
    empty = optuna.create_study(directions=["maximize", "minimize"], study_name="e")
    page = check_page(write_report(empty, tmp_path / "empty.html"), pareto_front(empty))
    assert "0 complete trials, 0 on the front" in page
    # Written again over an old page.
    write_report(searched, tmp_path / "empty.html")
    assert "0 complete trials" not in (tmp_path / "empty.html").read_text(encoding="utf-8")


def test_studies_that_name_no_objective_read_the_default_ones() -> None:
    """trial_metrics keeps its own copy of the default objectives (it is read without
    torch): the same as measure's."""
    from autoprune.measure import DEFAULT_OBJECTIVES
    from autoprune.study.trial_metrics import METRIC_NAMES

    assert tuple(METRIC_NAMES) == tuple(DEFAULT_OBJECTIVES)
