"""Report: the front as a table, plotly figures, one self-contained HTML page.

Computing is kept apart from drawing: the tables are plain DataFrames (tested on their own),
the figures only draw them.
"""

from __future__ import annotations

import html
from pathlib import Path

import optuna
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from autoprune.search import STUDY_ATTR
from autoprune.sensitivity import SENSITIVITY_ATTR

# Stable column order of the front table; per-layer sparsities follow as "sparsity:<layer>".
COLUMNS = [
    "trial",
    "accuracy",
    "test_accuracy",
    "nonzero_params",
    "density",
    "sparsity",
    "criterion",
    "scope",
    "rule",
    "alpha",
    "schedule",
]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per complete trial, front and dominated alike; ``on_front`` marks the front."""
    front = {t.number for t in study.best_trials}
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = [_row(t, t.number in front) for t in trials]
    frame = pd.DataFrame(rows, columns=[*COLUMNS, "on_front"] if not rows else None)
    return frame.sort_values("nonzero_params", kind="stable").reset_index(drop=True)


def pareto_front(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front (``study.best_trials``), one row per trial, smallest model first.

    Columns: ``trial``, ``accuracy`` (validation), ``test_accuracy``, ``nonzero_params``,
    ``density``, ``sparsity``, ``criterion``, ``scope``, ``rule``, ``alpha``, ``schedule``,
    then
    ``sparsity:<layer>`` (achieved) for every pruned layer.
    """
    rows = [_row(t, True) for t in study.best_trials]
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.DataFrame(rows).drop(columns="on_front")
    return frame.sort_values(["nonzero_params", "trial"]).reset_index(drop=True)


def _row(trial: FrozenTrial, on_front: bool) -> dict[str, object]:
    attrs, policy = trial.user_attrs, trial.user_attrs.get("policy", {})
    accuracy, nonzero = trial.values
    row: dict[str, object] = {
        "trial": trial.number,
        "accuracy": accuracy,
        "test_accuracy": attrs.get("test_accuracy", float("nan")),
        "nonzero_params": int(nonzero),
        "density": attrs.get("density", float("nan")),
        "sparsity": 1.0 - attrs.get("density", float("nan")),
        "criterion": policy.get("criterion"),
        "scope": policy.get("scope"),
        "rule": policy.get("rule"),
        "alpha": policy.get("alpha") if policy.get("rule") == "mean" else float("nan"),
        "schedule": policy.get("schedule", "oneshot"),
    }
    for layer, value in attrs.get("layer_sparsity", {}).items():
        row[f"sparsity:{layer}"] = value
    row["on_front"] = on_front
    return row


def pareto_figure(frame: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Validation accuracy against nonzero weights; dominated trials faded.

    Args:
        frame: :func:`trials_frame` output.
    """
    fig = go.Figure()
    for on_front, name, opacity in ((False, "dominated", 0.25), (True, "Pareto front", 1.0)):
        part = frame[frame["on_front"] == on_front]
        fig.add_trace(
            go.Scatter(
                x=part["nonzero_params"],
                y=part["accuracy"],
                mode="markers+lines" if on_front else "markers",
                name=name,
                opacity=opacity,
                text=[_hover(r) for _, r in part.iterrows()],
                hovertemplate="%{text}<extra></extra>",
                line={"shape": "hv"},
                marker={"size": 9 if on_front else 7},
            )
        )
    fig.update_layout(
        title=title or "Pareto front",
        xaxis_title="nonzero prunable weights (log)",
        yaxis_title="validation accuracy",
        xaxis_type="log",
        hovermode="closest",
    )
    return fig


def _hover(row: pd.Series) -> str:
    lines = [
        f"trial {row['trial']}",
        f"val accuracy {row['accuracy']:.4f}",
        f"test accuracy {row['test_accuracy']:.4f}",
        f"nonzero {row['nonzero_params']} (density {row['density']:.3f})",
        f"criterion {row['criterion']}, scope {row['scope']}, rule {row['rule']}",
    ]
    if row["rule"] == "mean":
        lines.append(f"alpha {row['alpha']:.3f}")
    lines += [
        f"{key.split(':', 1)[1]}: {value:.3f}"
        for key, value in row.items()
        if str(key).startswith("sparsity:") and pd.notna(value)
    ]
    return "<br>".join(lines)


def loss_curves_figure(study: optuna.Study) -> go.Figure:
    """Fine-tuning loss curves (train solid, validation dashed) of the front trials."""
    fig = go.Figure()
    palette = plotly.colors.qualitative.Plotly
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    for i, trial in enumerate(front):
        history = trial.user_attrs.get("history", {})
        density = trial.user_attrs.get("density", float("nan"))
        color = palette[i % len(palette)]  # a trial's train and val curves share a colour
        for split, dash in (("train", "solid"), ("val", "dash")):
            points = history.get(split, [])
            if points:
                fig.add_trace(
                    go.Scatter(
                        x=[p[0] for p in points],
                        y=[p[1] for p in points],
                        mode="lines+markers",
                        line={"dash": dash, "color": color},
                        legendgroup=str(trial.number),
                        name=f"trial {trial.number} {split} (density {density:.3f})",
                    )
                )
    fig.update_layout(
        title="Fine-tuning loss of the front trials",
        xaxis_title="epoch",
        yaxis_title="loss",
        yaxis_type="log",
    )
    return fig


def sensitivity_figure(curves: dict[str, list[list[float]]]) -> go.Figure:
    """Each layer's validation accuracy against its sparsity, pruned alone (no fine-tuning)."""
    fig = go.Figure()
    for layer, curve in curves.items():
        fig.add_trace(
            go.Scatter(
                x=[s for s, _ in curve], y=[a for _, a in curve], mode="lines+markers", name=layer
            )
        )
    fig.update_layout(
        title="Sensitivity: one layer pruned at a time, no fine-tuning",
        xaxis_title="sparsity of the layer",
        yaxis_title="validation accuracy",
    )
    return fig


def write_report(study: optuna.Study, path: str | Path) -> Path:
    """Write a self-contained HTML page (plotly.js embedded, works offline); return its path."""
    path = Path(path)
    setup = study.user_attrs.get(STUDY_ATTR, {})
    frame = trials_frame(study)
    figures = [
        pareto_figure(frame, title=f"Pareto front of study {study.study_name!r}"),
        loss_curves_figure(study),
    ]
    if SENSITIVITY_ATTR in study.user_attrs:
        figures.append(sensitivity_figure(study.user_attrs[SENSITIVITY_ATTR]))
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)
    ]
    front = pareto_front(study)
    dense = setup.get("dense", {})
    dense_text = ", ".join(
        f"{key} {value:.4f}" if value % 1 else f"{key} {int(value)}"
        for key, value in dense.items()
        if isinstance(value, (int, float))
    )
    body = "\n".join(
        [
            f"<h1>autoprune report: {html.escape(study.study_name)}</h1>",
            f"<p>{len(frame)} complete trials, {len(front)} on the front; task "
            f"{html.escape(str(setup.get('task')))}; dense model: {html.escape(dense_text)}</p>",
            *parts,
            "<h2>Pareto front</h2>",
            front.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""),
        ]
    )
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>autoprune: {html.escape(study.study_name)}</title></head>"
        f"<body style='font-family: sans-serif'>{body}</body></html>\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    return path
