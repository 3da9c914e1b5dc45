"""The ``autoprune_front`` table: the current Pareto front as plain SQL, for any dashboard.

After each completed trial that reaches the front, the study's rows are replaced in one
transaction (SQLAlchemy Core, in the study's own database, next to but apart from Optuna's
tables), so that Grafana, Metabase, Superset or ``pandas.read_sql`` can read the front without
Optuna. The front itself is Optuna's (``study.best_trials``, kept current after each trial by
:func:`autoprune.study.front.current_front`); this is only a copy of it, written from the
front trials' whole records.
"""

from __future__ import annotations

import datetime
import json
import logging
import math

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState

from autoprune.study.artifacts import ARTIFACT_ID_ATTR, dominated, rdb_storage
from autoprune.study.front import current_front
from autoprune.study.trial_metrics import metric_names, study_total_params, trial_metrics
from autoprune.study.trials import full_trials

logger = logging.getLogger(__name__)

TABLE = "autoprune_front"
# Metrics with a column of their own (NULL when a study does not have them); every metric,
# these and others, is also in the ``metrics`` JSON column.
METRIC_COLUMNS = (
    "accuracy",
    "test_accuracy",
    "nonzero_params",
    "density",
    "bytes",
    "macs",
    "latency_ms",
)


def front_table(metadata: sa.MetaData, name: str = TABLE) -> sa.Table:
    """The table's schema: one row per front trial of each study."""
    return sa.Table(
        name,
        metadata,
        sa.Column("study_name", sa.String(512), primary_key=True),
        sa.Column("trial_number", sa.Integer, primary_key=True),
        *(sa.Column(metric, sa.Float, nullable=True) for metric in METRIC_COLUMNS),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("artifact_id", sa.String(64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


class FrontTable:
    """Writes a study's front to the table; a study callback (see :meth:`__call__`).

    Args:
        engine: The database (usually the study's own).
        name: Table name; ``autoprune_front`` unless you keep several.
    """

    def __init__(self, engine: sa.Engine, *, name: str = TABLE):
        self.engine = engine
        self.table = front_table(sa.MetaData(), name)
        self._created = False

    @classmethod
    def for_study(cls, study: optuna.Study) -> FrontTable | None:
        """The table in ``study``'s database; None if the study is not in a database."""
        storage = rdb_storage(study)
        return None if storage is None else cls(storage.engine)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Rewrite the study's rows if ``trial`` completed on the front (study callback)."""
        if trial.state != TrialState.COMPLETE or dominated(study, trial.values):
            return  # a failed, stopped or dominated trial leaves the front as it was
        try:
            self.write(study)
        except sa.exc.SQLAlchemyError as e:  # a copy for dashboards must not stop the search
            logger.warning("could not write the %s table: %s", self.table.name, e)

    def write(self, study: optuna.Study) -> int:
        """Replace ``study``'s rows by its current front in one transaction; return the count."""
        names = metric_names(study)
        total = study_total_params(study)
        now = datetime.datetime.now(datetime.UTC)
        front = full_trials(study, [t.number for t in current_front(study)])
        rows = [_row(study.study_name, t, names, total, now) for t in front]
        if not self._created:
            self.table.create(self.engine, checkfirst=True)
            self._created = True
        with self.engine.begin() as connection:
            connection.execute(
                sa.delete(self.table).where(self.table.c.study_name == study.study_name)
            )
            if rows:
                connection.execute(sa.insert(self.table), rows)
        logger.debug("wrote %d front rows of study %r", len(rows), study.study_name)
        return len(rows)


def _row(
    study_name: str,
    trial: FrozenTrial,
    names: list[str],
    total: float | None,
    now: datetime.datetime,
) -> dict[str, object]:
    metrics = trial_metrics(trial, names, total_params=total)
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}  # JSON has no NaN
    return {
        "study_name": study_name,
        "trial_number": trial.number,
        **{column: finite.get(column) for column in METRIC_COLUMNS},
        "metrics": json.dumps(finite, sort_keys=True),
        "policy": json.dumps(trial.user_attrs.get("policy", {}), sort_keys=True),
        "artifact_id": trial.user_attrs.get(ARTIFACT_ID_ATTR),
        "updated_at": now,
    }
