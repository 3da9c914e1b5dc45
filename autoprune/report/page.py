"""The HTML dashboard: one self-contained page (plotly.js inline, works offline).

:func:`dashboard_data` computes everything the page shows (plain frames and dicts, tested on
their own), :func:`dashboard_figures` draws them, :func:`render` lays out the page. Clicking a
point of the Pareto front shows that trial's detail: a small inline handler on
``plotly_click`` reads the per-trial JSON embedded in the page.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go

from autoprune._files import atomic_write, check_output_file
from autoprune.errors import AutopruneError, SpecError
from autoprune.report.data import (
    MAX_DOMINATED,
    StudyRead,
    aspects_frame,
    front_share,
    hypervolume_history,
    param_importances,
    pareto_front,
    read_study,
    sensitivity_frame,
    states_over_time,
    trial_details,
    trials_frame,
)
from autoprune.report.figures import (
    hypervolume_figure,
    importance_figure,
    loss_curves_figure,
    pareto_figure,
    sensitivity_figure,
    share_figure,
    states_figure,
)
from autoprune.study.pick import pick
from autoprune.study.record import recorded_dense, recorded_task
from autoprune.study.trial_metrics import size_metric

logger = logging.getLogger(__name__)

_SCRIPT = (Path(__file__).with_name("dashboard.js")).read_text(encoding="utf-8")
_STYLE = """
body { font-family: sans-serif; margin: 1em 2em; }
.row { display: grid; grid-template-columns: 3fr 2fr; gap: 1em; align-items: start; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
#detail table { border-collapse: collapse; font-size: 90%; }
#detail td { padding: 1px 8px; border-bottom: 1px solid #eee; }
table.front { border-collapse: collapse; font-size: 85%; }
table.front td, table.front th { padding: 2px 6px; border: 1px solid #ddd; }
"""


@dataclasses.dataclass
class DashboardData:
    """Everything the dashboard shows, before any drawing. Frames of several studies are
    stacked with a ``study`` column; points and details share the key ``"<study>/<trial>"``.
    """

    studies: list[str]
    summaries: list[str]
    reads: list[StudyRead]
    trials: pd.DataFrame
    front: pd.DataFrame
    size: str
    hypervolume: pd.DataFrame
    states: pd.DataFrame
    share: pd.DataFrame
    importances: pd.DataFrame
    importance_reason: str
    sensitivity: pd.DataFrame
    details: dict[str, dict[str, Any]]
    initial: str | None


def dashboard_data(
    studies: Sequence[optuna.Study], *, max_dominated: int | None = MAX_DOMINATED
) -> DashboardData:
    """Compute the dashboard of ``studies`` (their fronts share one plot). Each study is read
    once (:func:`autoprune.report.data.read_study`) and its importances computed once.

    Args:
        max_dominated: Dominated trials shown per study at most (None: all).
    """
    names = [s.study_name for s in studies]
    sizes = {size_metric(s) for s in studies}
    # Studies that minimise different sizes still compare on density.
    size = sizes.pop() if len(sizes) == 1 else "density"
    reads = [read_study(s, max_dominated=max_dominated) for s in studies]
    trials, fronts, share, importances, reasons = [], [], [], [], []
    details: dict[str, dict[str, Any]] = {}
    for study, read in zip(studies, reads, strict=True):
        name = study.study_name
        frame = trials_frame(study, read)
        trials.append(frame.assign(study=name, key=_keys(study, frame["trial"])))
        fronts.append(pareto_front(study, read.front).assign(study=name))
        share.append(front_share(aspects_frame(read)).assign(study=name))
        found, reason = param_importances(study, read.complete)
        importances.append(found.assign(study=name))
        reasons += [f"{name}: {reason}"] if reason else []
        details.update(trial_details(study, key_prefix=f"{name}/", trials=read.shown))
    return DashboardData(
        studies=names,
        summaries=[_summary(s, r) for s, r in zip(studies, reads, strict=True)],
        reads=reads,
        trials=_stack(trials),
        front=_stack(fronts),
        size=size,
        hypervolume=_stack(
            [
                hypervolume_history(s, r.complete).assign(study=s.study_name)
                for s, r in zip(studies, reads, strict=True)
            ]
        ),
        states=_stack(
            [
                states_over_time(s, r.summaries).assign(study=s.study_name)
                for s, r in zip(studies, reads, strict=True)
            ]
        ),
        share=_stack(share),
        importances=_stack(importances),
        importance_reason="; ".join(reasons),
        sensitivity=_stack([sensitivity_frame(s).assign(study=s.study_name) for s in studies]),
        details=details,
        initial=_initial(studies[0], reads[0]),
    )


def _keys(study: optuna.Study, numbers: pd.Series) -> list[str]:
    return [f"{study.study_name}/{n}" for n in numbers]


def _stack(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty] or frames[:1]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _initial(study: optuna.Study, read: StudyRead) -> str | None:
    """The trial shown before any click: the knee of the first study's front."""
    try:
        return f"{study.study_name}/{pick(study, knee=True, front=read.front).number}"
    except AutopruneError:  # an empty front
        return None


def _summary(study: optuna.Study, read: StudyRead) -> str:
    dense = ", ".join(
        f"{key} {value:.4f}" if value % 1 else f"{key} {int(value)}"
        for key, value in recorded_dense(study).items()
        if isinstance(value, (int, float))
    )
    shown = len(read.shown) - len(read.front)
    sampled = (
        f" ({shown} of the {read.dominated} dominated trials shown, spread over the study)"
        if shown < read.dominated
        else ""
    )
    return (
        f"{len(read.complete)} complete trials, {len(read.front)} on the front{sampled}; "
        f"task {recorded_task(study)}; "
        f"dense model: {dense}"
    )


def dashboard_figures(
    data: DashboardData, studies: Sequence[optuna.Study]
) -> dict[str, go.Figure]:
    """The page's figures by div id, drawn from ``data`` (loss curves: the first study's)."""
    title = "Pareto front of " + ", ".join(repr(n) for n in data.studies)
    figures = {
        "pareto": pareto_figure(data.trials, title=title, size=data.size),
        "hypervolume": hypervolume_figure(data.hypervolume),
        "states": states_figure(data.states),
        "share": share_figure(data.share),
        "importances": importance_figure(data.importances, data.importance_reason),
    }
    if not data.sensitivity.empty:
        figures["sensitivity"] = sensitivity_figure(data.sensitivity)
    figures["loss-curves"] = loss_curves_figure(studies[0], data.reads[0].front)
    return figures


def render(data: DashboardData, figures: dict[str, go.Figure], *, refresh: float | None) -> str:
    """The HTML page: figures, the trial detail panel, the front table, the click handler."""
    parts = {
        div: fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=div)
        for i, (div, fig) in enumerate(figures.items())
    }
    names = ", ".join(data.studies)
    summaries = [
        f"<p>{html.escape(s if len(data.studies) == 1 else f'{n}: {s}')}</p>"
        for n, s in zip(data.studies, data.summaries, strict=True)
    ]
    front = data.front if len(data.studies) > 1 else data.front.drop(columns="study")
    if len(data.studies) > 1:
        front = front[["study", *[c for c in front.columns if c != "study"]]]
    # No "<" at all inside the script element: nothing in user data can close it.
    details = json.dumps(data.details, allow_nan=False).replace("<", "\\u003c")
    grid = [
        parts[d]
        for d in ("hypervolume", "states", "share", "importances", "sensitivity")
        if d in parts
    ]
    meta = f"<meta http-equiv='refresh' content='{refresh:g}'>" if refresh else ""
    body = "\n".join(
        [
            f"<h1>autoprune report: {html.escape(names)}</h1>",
            *summaries,
            "<div class='row'>",
            parts["pareto"],
            "<div id='detail'><h3 id='detail-title'>click a point</h3>"
            "<table><tbody id='detail-rows'></tbody></table>"
            "<div id='detail-sparsity'></div><div id='detail-loss'></div></div>",
            "</div>",
            "<div class='grid'>",
            *grid,
            "</div>",
            parts["loss-curves"],
            "<h2>Pareto front</h2>",
            front.to_html(
                index=False, float_format=lambda v: f"{v:.4g}", na_rep="", classes="front"
            ),
            f"<script type='application/json' id='autoprune-details'>{details}</script>",
            f"<script>{_SCRIPT}</script>",
        ]
    )
    initial = html.escape(data.initial or "", quote=True)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'>{meta}"
        f"<title>autoprune: {html.escape(names)}</title><style>{_STYLE}</style></head>"
        f"<body data-initial='{initial}'>{body}</body></html>\n"
    )


def write_report(
    studies: optuna.Study | Sequence[optuna.Study],
    path: str | Path,
    *,
    refresh: float | None = None,
) -> Path:
    """Write the dashboard of one or more studies to ``path`` (atomically); return the path.

    Concurrent writers of one path (two ``report --watch``, a search finishing beside one)
    each write a temporary file of their own: a reader sees one whole page.

    Args:
        refresh: Seconds after which a browser reloads the page (for ``--watch``).

    Raises:
        OutputError: If ``path`` cannot be written (checked before the page is computed).
    """
    studies = [studies] if isinstance(studies, optuna.Study) else list(studies)
    if not studies:
        raise SpecError("give at least one study to report")
    path = check_output_file(path)
    data = dashboard_data(studies)
    page = render(data, dashboard_figures(data, studies), refresh=refresh)
    return atomic_write(path, page)


# The clock and the wait of --watch (tests replace them).
_now = time.monotonic
_sleep = time.sleep


def watch_report(
    studies: Sequence[optuna.Study],
    path: str | Path,
    *,
    every: float,
    rounds: int | None = None,
) -> Path:
    """Rewrite the dashboard every ``every`` seconds (``rounds`` times; None: until
    interrupted), each page telling the browser to reload itself as often.

    A rewrite never starts while the last one runs: one that takes longer than ``every``
    makes the next start at the next whole multiple of ``every`` after it began (the turns it
    overran are skipped, not queued), and the pages then ask the browser to reload at that
    pace, not faster than they change.

    Raises:
        SpecError: If ``every`` is not a positive number of seconds.
    """
    if not every > 0:
        raise SpecError(f"watch interval must be > 0 seconds, got {every!r}")
    done, period = 0, every
    while True:
        started = _now()
        out = write_report(studies, path, refresh=period)
        took = _now() - started
        done += 1
        turns = max(1, math.ceil(took / every - 1e-9))
        if turns > 1 and period != every * turns:
            logger.warning(
                "rewriting the report took %.3g s, longer than the %g s interval: "
                "rewriting it every %g s",
                took,
                every,
                every * turns,
            )
        period = every * turns
        logger.info("report rewritten (%s)", time.strftime("%H:%M:%S"))
        if rounds is not None and done >= rounds:
            return out
        _sleep(max(0.0, started + period - _now()))
