"""Plotly figures of the report: each draws a frame that :mod:`autoprune.report.data` computed.

Nothing here computes a number the page shows; a figure with nothing to draw says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from optuna.trial import FrozenTrial

from autoprune.study.front import front_trials

PALETTE = plotly.colors.qualitative.Plotly
# Points a line over time draws at most; longer lines keep the points where they change
# (hypervolume) or evenly spaced ones (counts), and always their last point.
MAX_LINE_POINTS = 1000
# Front trials whose loss curves are drawn as traces of their own, each in its colour.
MAX_CURVE_TRACES = 20
_SIZE_TITLES = {
    "nonzero_params": "nonzero prunable weights",
    "bytes": "bytes of the exported model",
    "macs": "multiply-adds per input",
    "latency_ms": "latency (ms)",
}


def pareto_figure(
    frame: pd.DataFrame, *, title: str = "", size: str = "nonzero_params"
) -> go.Figure:
    """Validation accuracy against a size objective (log); dominated trials faded.

    Args:
        frame: :func:`autoprune.report.data.trials_frame` output; with a ``study`` column, each
            study gets its own colour, and a ``key`` column becomes each point's
            ``customdata`` (what a click handler receives; the trial number otherwise).
        size: The column on the x axis.
    """
    fig = go.Figure()
    studies = list(dict.fromkeys(frame["study"])) if "study" in frame.columns else [None]
    for i, study in enumerate(studies):
        mine = frame if study is None else frame[frame["study"] == study]
        prefix = "" if study is None or len(studies) == 1 else f"{study}: "
        for on_front, name, opacity in ((False, "dominated", 0.25), (True, "Pareto front", 1.0)):
            part = mine[mine["on_front"] == on_front]
            keys = part["key"] if "key" in part.columns else part["trial"].astype(str)
            fig.add_trace(
                go.Scatter(
                    x=part[size],
                    y=part["accuracy"],
                    customdata=list(keys),
                    mode="markers+lines" if on_front else "markers",
                    name=prefix + name,
                    legendgroup=str(study),
                    opacity=opacity,
                    text=[_hover(r) for r in part.to_dict("records")],
                    hovertemplate="%{text}<extra></extra>",
                    line={"shape": "hv", "color": PALETTE[i % len(PALETTE)]},
                    marker={"size": 9 if on_front else 7, "color": PALETTE[i % len(PALETTE)]},
                )
            )
    fig.update_layout(
        title=title or "Pareto front",
        xaxis_title=f"{_SIZE_TITLES.get(size, size)} (log)",
        yaxis_title="validation accuracy",
        xaxis_type="log",
        hovermode="closest",
    )
    return fig


def _hover(row: dict[str, Any]) -> str:
    lines = [f"{row['study']}: " if "study" in row else ""]
    lines[0] += f"trial {row['trial']}"
    lines += [
        f"val accuracy {row['accuracy']:.4f}",
        f"test accuracy {row['test_accuracy']:.4f}",
        f"nonzero {row['nonzero_params']} (density {row['density']:.3f})",
        f"criterion {row['criterion']}, scope {row['scope']}, rule {row['rule']}",
    ]
    if row["rule"] == "mean":
        lines.append(f"alpha {row['alpha']:.3f}")
    if isinstance(row.get("quantization"), str):
        lines.append(f"quantization {row['quantization']}")
    # Recovery columns are in a frame whose trials do not all use the task's recipe.
    recovery = [
        f"{key} {row[key]}"
        for key in ("distill", "lr_scale", "rewind")
        if key in row and pd.notna(row[key])
    ]
    if recovery:
        lines.append(", ".join(recovery))
    lines += [
        f"{key.split(':', 1)[1]}: {value:.3f}"
        for key, value in row.items()
        if str(key).startswith("sparsity:") and pd.notna(value)
    ]
    return "<br>".join(lines)


def loss_curves_figure(
    study: optuna.Study, front: Sequence[FrozenTrial] | None = None
) -> go.Figure:
    """Fine-tuning loss curves (train solid, validation dashed) of the front trials (``front``,
    whole, if the caller has read them). A front of more than ``MAX_CURVE_TRACES`` trials is
    drawn as one line per split, its trials apart (hover names each): every curve, without
    the hundreds of traces that keep a browser busy for seconds."""
    fig = go.Figure()
    front = front_trials(study) if front is None else front
    trials = sorted(front, key=lambda t: t.values[1])
    curves = [(trial, trial.user_attrs.get("history", {})) for trial in trials]
    if len(trials) > MAX_CURVE_TRACES:
        for split, dash in (("train", "solid"), ("val", "dash")):
            x: list[float | None] = []
            y: list[float | None] = []
            text: list[str] = []
            for trial, history in curves:
                points = history.get(split, [])
                x += [p[0] for p in points] + [None]
                y += [p[1] for p in points] + [None]
                text += [f"trial {trial.number}"] * len(points) + [""]
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    text=text,
                    mode="lines",
                    line={"dash": dash, "width": 1},
                    opacity=0.5,
                    name=f"{split} ({len(trials)} front trials)",
                    hovertemplate="%{text}: %{y:.4g}<extra></extra>",
                )
            )
    else:
        for i, (trial, history) in enumerate(curves):
            density = trial.user_attrs.get("density", float("nan"))
            color = PALETTE[i % len(PALETTE)]  # a trial's train and val curves share a colour
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


def hypervolume_figure(history: pd.DataFrame) -> go.Figure:
    """Hypervolume over time, one line per study (``study`` column of stacked histories)."""
    fig = go.Figure()
    for i, (study, part) in enumerate(_by_study(history)):
        if len(part) > MAX_LINE_POINTS:  # a step line: its steps are all it shows
            changed = part["hypervolume"].ne(part["hypervolume"].shift())
            changed.iloc[-1] = True
            part = part[changed]
        fig.add_trace(
            go.Scatter(
                x=part["completed"],
                y=part["hypervolume"],
                mode="lines+markers",
                line={"shape": "hv", "color": PALETTE[i % len(PALETTE)]},
                name=study,
                text=[f"trial {n}" for n in part["trial"]],
            )
        )
    return _titled(
        fig,
        history,
        "Hypervolume over time (accuracy × decades of compression, dense at 0)",
        "time",
        "hypervolume",
    )


def states_figure(states: pd.DataFrame) -> go.Figure:
    """Cumulative trials by state over time, one line per (study, state)."""
    fig = go.Figure()
    for study, part in _by_study(states):
        for state, rows in part.groupby("state", sort=True):
            rows = _thinned(rows)
            fig.add_trace(
                go.Scatter(
                    x=rows["time"],
                    y=rows["count"],
                    mode="lines",
                    line={"shape": "hv"},
                    name=f"{study}: {state}" if study else str(state),
                )
            )
    return _titled(fig, states, "Trials over time by state", "time", "trials")


def share_figure(share: pd.DataFrame) -> go.Figure:
    """Share of the front taken by each criterion, scope, rule (and granularity)."""
    fig = go.Figure()
    for study, part in _by_study(share):
        fig.add_trace(
            go.Bar(
                x=[f"{a}={v}" for a, v in zip(part["aspect"], part["value"], strict=True)],
                y=part["share_of_front"],
                name=study or "share of front",
                text=[
                    f"{n}/{t} on the front"
                    for n, t in zip(part["on_front"], part["trials"], strict=True)
                ],
                hovertemplate="%{x}: %{y:.0%} of the front (%{text})<extra></extra>",
            )
        )
    fig.update_layout(barmode="group", yaxis_tickformat=".0%")
    return _titled(fig, share, "Share of the front by policy choice", "", "share of the front")


def importance_figure(importances: pd.DataFrame, reason: str = "") -> go.Figure:
    """Optuna's parameter importances, one bar group per (study, objective)."""
    fig = go.Figure()
    for study, part in _by_study(importances):
        for objective, rows in part.groupby("objective", sort=False):
            fig.add_trace(
                go.Bar(
                    x=rows["importance"],
                    y=rows["param"],
                    orientation="h",
                    name=f"{study}: {objective}" if study else str(objective),
                )
            )
    fig.update_layout(barmode="group")
    return _titled(fig, importances, "Parameter importances", "importance", "", reason)


def sensitivity_figure(curves: pd.DataFrame) -> go.Figure:
    """Accuracy against sparsity of each layer pruned alone."""
    fig = go.Figure()
    for study, part in _by_study(curves):
        for layer, rows in part.groupby("layer", sort=False):
            fig.add_trace(
                go.Scatter(
                    x=rows["sparsity"],
                    y=rows["accuracy"],
                    mode="lines+markers",
                    name=f"{study}: {layer}" if study else str(layer),
                )
            )
    title = "Sensitivity: one layer pruned at a time (magnitude, no fine-tune)"
    return _titled(fig, curves, title, "sparsity of that layer", "val accuracy")


def _thinned(rows: pd.DataFrame) -> pd.DataFrame:
    """At most ``MAX_LINE_POINTS`` rows, evenly spaced, the last one kept."""
    if len(rows) <= MAX_LINE_POINTS:
        return rows
    step = math.ceil(len(rows) / MAX_LINE_POINTS)
    keep = list(range(0, len(rows) - 1, step)) + [len(rows) - 1]
    return rows.iloc[keep]


def _by_study(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    if "study" not in frame.columns:
        return [("", frame)]
    return [(str(s), part) for s, part in frame.groupby("study", sort=False)]


def _titled(
    fig: go.Figure, frame: pd.DataFrame, title: str, x: str, y: str, reason: str = ""
) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y)
    if frame.empty:
        fig.add_annotation(
            text=reason or "nothing to show yet", showarrow=False, xref="paper", yref="paper"
        )
    return fig
