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

from autoprune.measure import DEFAULT_OBJECTIVES
from autoprune.search import STUDY_ATTR

# Stable column order of the front table (a study's size objectives stand where
# "nonzero_params" is); per-layer sparsities follow as "sparsity:<layer>".
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
]
# Size objectives that count things, shown as integers.
_COUNTS = ("nonzero_params", "bytes", "macs")
_AXIS_TITLES = {
    "nonzero_params": "nonzero prunable weights (log)",
    "bytes": "bytes of the exported model (log)",
    "macs": "multiply-adds per input (log)",
    "latency_ms": "latency, ms per batch (log)",
}


def objective_names(study: optuna.Study) -> list[str]:
    """The study's objective names in order: "accuracy", then its size objectives."""
    return list(study.metric_names or DEFAULT_OBJECTIVES)


def _columns(names: list[str]) -> list[str]:
    i = COLUMNS.index("nonzero_params")
    return [*COLUMNS[:i], *names[1:], *COLUMNS[i + 1 :]]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per complete trial, front and dominated alike; ``on_front`` marks the front."""
    names = objective_names(study)
    front = {t.number for t in study.best_trials}
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = [_row(t, t.number in front, names) for t in trials]
    frame = pd.DataFrame(rows, columns=[*_columns(names), "on_front"] if not rows else None)
    return frame.sort_values(names[1], kind="stable").reset_index(drop=True)


def pareto_front(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front (``study.best_trials``), one row per trial, smallest model first.

    Columns: ``trial``, ``accuracy`` (validation), ``test_accuracy``, the study's size
    objectives (``nonzero_params`` by default), ``density``, ``sparsity``, ``criterion``,
    ``scope``, ``rule``, ``alpha``, then ``sparsity:<layer>`` (achieved) for every pruned layer.
    Structured trials add ``granularity`` and ``removed_blocks``.
    """
    names = objective_names(study)
    rows = [_row(t, True, names) for t in study.best_trials]
    if not rows:
        return pd.DataFrame(columns=_columns(names))
    frame = pd.DataFrame(rows).drop(columns="on_front")
    return frame.sort_values([names[1], "trial"]).reset_index(drop=True)


def _row(trial: FrozenTrial, on_front: bool, names: list[str]) -> dict[str, object]:
    attrs, policy = trial.user_attrs, trial.user_attrs.get("policy", {})
    values = dict(zip(names, trial.values, strict=True))
    row: dict[str, object] = {
        "trial": trial.number,
        "accuracy": values["accuracy"],
        "test_accuracy": attrs.get("test_accuracy", float("nan")),
    }
    for name in names[1:]:
        row[name] = int(values[name]) if name in _COUNTS else values[name]
    row |= {
        "density": attrs.get("density", float("nan")),
        "sparsity": 1.0 - attrs.get("density", float("nan")),
        "criterion": policy.get("criterion"),
        "scope": policy.get("scope"),
        "rule": policy.get("rule"),
        "alpha": policy.get("alpha") if policy.get("rule") == "mean" else float("nan"),
    }
    if "granularity" in policy:
        row["granularity"] = policy["granularity"]
        row["removed_blocks"] = ", ".join(policy.get("removed_blocks", ()))
    for layer, value in attrs.get("layer_sparsity", {}).items():
        row[f"sparsity:{layer}"] = value
    row["on_front"] = on_front
    return row


def pareto_figure(
    frame: pd.DataFrame, *, title: str = "", size: str = "nonzero_params"
) -> go.Figure:
    """Validation accuracy against the size objective ``size``; dominated trials faded.

    Args:
        frame: :func:`trials_frame` output.
    """
    fig = go.Figure()
    for on_front, name, opacity in ((False, "dominated", 0.25), (True, "Pareto front", 1.0)):
        part = frame[frame["on_front"] == on_front]
        fig.add_trace(
            go.Scatter(
                x=part[size],
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
        xaxis_title=_AXIS_TITLES.get(size, f"{size} (log)"),
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
        *[f"{name} {row[name]:.6g}" for name in _AXIS_TITLES if name in row],
        f"density {row['density']:.3f}",
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


def write_report(study: optuna.Study, path: str | Path) -> Path:
    """Write a self-contained HTML page (plotly.js embedded, works offline); return its path."""
    path = Path(path)
    setup = study.user_attrs.get(STUDY_ATTR, {})
    frame = trials_frame(study)
    figures = [
        pareto_figure(
            frame,
            title=f"Pareto front of study {study.study_name!r}",
            size=objective_names(study)[1],
        ),
        loss_curves_figure(study),
    ]
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
