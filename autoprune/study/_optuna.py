"""Everything autoprune reaches below Optuna's public API, in one place (checked against
Optuna 5.0.0; the tests compare each piece with what Optuna's public API returns).

Why each is needed:

- A study of 10,000 trials read with ``study.get_trials`` builds every trial with every
  attribute through SQLAlchemy's ORM: about 20 s and 300 MB here. The reading commands need
  the states and values of all trials and the attributes of the few they show, so
  :func:`read_trials` reads Optuna's tables with SQLAlchemy Core, only what is asked for.
- A worker keeps every trial of its study in Optuna's cache. :class:`LeanRDBStorage` reads
  finished trials into that cache without their bulky records (loss curves, policy, timings,
  per-layer sparsity: ``LEAN_DROPS``), so that a worker's memory stays flat over a night.
- The Pareto front is Optuna's own function (what ``study.best_trials`` calls), applied to the
  trials autoprune read, instead of ``best_trials``' deep copy of every trial.
- :class:`WindowedStudy` shows a sampler a bounded part of the study (see
  :mod:`autoprune.study.samplers`), and :class:`FixedStudy` an importance evaluator a sample.
- :func:`importance_package` imports ``optuna.importance`` without scikit-learn, which it
  imports for fANOVA (1.5 s of CPU with SciPy, a third of ``autoprune report`` at 10,000
  trials, which uses PED-ANOVA there).
- The storage of a study, its id and a trial's id are private attributes.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import sys
from collections.abc import Collection, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import optuna
import sqlalchemy as sa

# Optuna's hypervolume and front (``study.best_trials`` calls the latter).
from optuna._hypervolume import compute_hypervolume as hypervolume  # noqa: F401
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled as _heartbeat_enabled
from optuna.storages._rdb import models
from optuna.study import StudyDirection
from optuna.study._multi_objective import _fast_non_domination_rank, _is_pareto_front
from optuna.trial import FrozenTrial, TrialState

# Bulky user attrs that the trial loop never reads from a finished trial (only the commands
# that show a trial do, and they read it from the database); system attrs by prefix likewise
# (TPE reads its relative params of running trials only).
LEAN_DROPS = ("history", "policy", "timings", "layer_sparsity")
LEAN_DROP_PREFIXES = ("tpe:relative_params:",)
# System attrs that every read includes: a trial's constraints decide whether it can be on
# the front (Optuna's key, and its older list form) and its retries count toward the target.
CONSTRAINTS = "constraints"
ALWAYS_SYSTEM = (CONSTRAINTS, "retry_history")
# User attrs that every read includes: a screened trial (fidelity < 1) is never on the front,
# and counts its fidelity toward the target (autoprune.study.fidelity).
FIDELITY_ATTR = "fidelity"
ALWAYS_USER = (FIDELITY_ATTR,)

_TRIALS = models.TrialModel.__table__
_VALUES = models.TrialValueModel.__table__
_PARAMS = models.TrialParamModel.__table__
_USER = models.TrialUserAttributeModel.__table__
_SYSTEM = models.TrialSystemAttributeModel.__table__
_INTERMEDIATE = models.TrialIntermediateValueModel.__table__
_UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)
_STATES = {state.name: state for state in TrialState}
_UTC = datetime.UTC


def storage_of(study: optuna.Study) -> Any:
    """The storage object of ``study`` (Optuna keeps it private)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of ``study``."""
    return study._study_id


def trial_id(trial: FrozenTrial) -> int:
    """The storage's id of ``trial``."""
    return trial._trial_id


def rdb_storage(study: optuna.Study) -> RDBStorage | None:
    """The SQLAlchemy-backed storage of ``study`` (unwrapped from Optuna's cache), or None."""
    storage = getattr(study, "_storage", None)
    storage = getattr(storage, "_backend", storage)
    return storage if isinstance(storage, RDBStorage) else None


def journal_file(study: optuna.Study) -> str | None:
    """The file of a study in a journal file storage, or None."""
    backend = getattr(getattr(study, "_storage", None), "_backend", None)
    return getattr(backend, "_file_path", None)


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats of running trials."""
    return _heartbeat_enabled(study._storage)


def pareto_front(
    trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]
) -> list[FrozenTrial]:
    """``study.best_trials`` of a study holding ``trials``: its complete, feasible trials that no
    other dominates, in the order given. Screened trials (user attr ``fidelity`` below 1, see
    :mod:`autoprune.study.fidelity`) are left out, as infeasible ones are.

    As Optuna's ``_get_pareto_front_trials_by_trials`` (what ``best_trials`` calls), with its
    per-value normalisation done by numpy (a tenth of a second at 10,000 trials). Optuna
    filters infeasible trials only when some trial has constraints; filtering always is the
    same, since a trial without constraints is feasible.
    """
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    feasible = [
        t
        for t in complete
        if (not t.system_attrs or all(c <= 0.0 for c in t.constraints.values()))
        and t.user_attrs.get(FIDELITY_ATTR, 1.0) >= 1.0
    ]
    if not feasible:
        return []
    signs = [-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions]
    losses = np.asarray([t.values for t in feasible], dtype=float) * signs
    on_front = _is_pareto_front(losses, assume_unique_lexsorted=False)
    return [t for t, on in zip(feasible, on_front, strict=True) if on]


def non_domination_ranks(losses: np.ndarray) -> list[int]:
    """Non-dominated rank (0: the front) of each row of ``losses`` (minimised): Optuna's
    function, the one its NSGA-II sorts by."""
    return [int(r) for r in _fast_non_domination_rank(losses)]


def is_enqueued(trial: optuna.Trial) -> bool:
    """Whether ``trial`` was enqueued with fixed params (``study.enqueue_trial``: warm starts,
    promotions) rather than sampled: Optuna's ``fixed_params`` system attr (checked against
    Optuna 5.0)."""
    attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    return "fixed_params" in attrs


def read_trials(
    storage: RDBStorage,
    study: int,
    *,
    numbers: Collection[int] | None = None,
    states: Collection[TrialState] | None = None,
    user_attrs: Collection[str] | None = None,
    params: bool = True,
    where: Any = None,
    lean: bool = False,
) -> list[FrozenTrial]:
    """Trials of study id ``study`` as Optuna builds them, read with SQLAlchemy Core.

    Args:
        numbers, states: Only these trials (None: all).
        user_attrs: Only these user attrs and ``ALWAYS_USER`` (None: all). System attrs are
            all read when user attrs are, else only ``ALWAYS_SYSTEM`` ones.
        params: Read params and distributions (else both are empty).
        where: A further SQLAlchemy condition on Optuna's ``trials`` table.
        lean: Finished trials leave out ``LEAN_DROPS`` and ``LEAN_DROP_PREFIXES``.

    Returns:
        The trials in the order of their ids (that is, of their numbers), as the first query
        found them: the queries that fill them in run one after another while other workers
        write (PostgreSQL reads each at its own snapshot), so rows of a trial made, or moved
        into ``states``, since then are left out rather than looked up.
    """
    condition = _TRIALS.c.study_id == study
    if numbers is not None:
        condition &= _TRIALS.c.number.in_(sorted(set(numbers)))
    if states is not None:
        condition &= _TRIALS.c.state.in_(list(states))
    if where is not None:
        condition &= where

    def joined(table: sa.Table, *columns: Any) -> sa.Select[Any]:
        return (
            sa.select(table.c.trial_id, *columns)
            .join(_TRIALS, _TRIALS.c.trial_id == table.c.trial_id)
            .where(condition)
        )

    unfinished = _TRIALS.c.state.in_(_UNFINISHED)
    user = joined(_USER, _USER.c.key, _USER.c.value_json)
    system = joined(_SYSTEM, _SYSTEM.c.key, _SYSTEM.c.value_json)
    if user_attrs is not None:
        user = user.where(_USER.c.key.in_([*user_attrs, *ALWAYS_USER]))
        system = system.where(
            _SYSTEM.c.key.in_(ALWAYS_SYSTEM) | _SYSTEM.c.key.startswith(CONSTRAINTS + ":")
        )
    if lean:
        user = user.where(unfinished | _USER.c.key.not_in(LEAN_DROPS))
        for prefix in LEAN_DROP_PREFIXES:
            system = system.where(unfinished | ~_SYSTEM.c.key.startswith(prefix))
    local = _LocalTime()
    with storage.engine.connect() as connection:
        rows = connection.execute(
            sa.select(
                _TRIALS.c.trial_id,
                _TRIALS.c.number,
                _raw(_TRIALS.c.state),
                _raw(_TRIALS.c.datetime_start),
                _raw(_TRIALS.c.datetime_complete),
            )
            .where(condition)
            .order_by(_TRIALS.c.trial_id)
        ).all()
        trials = {
            tid: _Parts(tid, number, _STATES[state], local(start), local(complete))
            for tid, number, state, start, complete in rows
        }
        if not trials:
            return []

        def ours(query: sa.Select[Any]) -> Iterator[Any]:
            """The rows of ``query`` of the trials read above (see Returns)."""
            return (row for row in connection.execute(query) if row[0] in trials)

        finite = models.TrialValueModel.TrialValueType.FINITE.name
        for tid, objective, value, kind in ours(
            joined(_VALUES, _VALUES.c.objective, _VALUES.c.value, _raw(_VALUES.c.value_type))
        ):
            trials[tid].values[objective] = (
                value
                if kind == finite
                else models.TrialValueModel.stored_repr_to_value(
                    value, models.TrialValueModel.TrialValueType[kind]
                )
            )
        if params:
            dists: dict[str, BaseDistribution] = {}
            for tid, name, value, text in ours(
                joined(_PARAMS, _PARAMS.c.param_name, _PARAMS.c.param_value)
                .add_columns(_PARAMS.c.distribution_json)
                .order_by(_PARAMS.c.param_id)
            ):
                dist = dists.get(text) or dists.setdefault(text, json_to_distribution(text))
                name = sys.intern(name)
                trials[tid].params[name] = dist.to_external_repr(value)
                trials[tid].distributions[name] = dist
        for target, (query, table) in enumerate(((user, _USER), (system, _SYSTEM))):
            # By key, as Optuna's own read returns them from SQLite (by the unique index).
            for tid, key, text in ours(query.order_by(table.c.key)):
                trials[tid].attrs[target][sys.intern(key)] = json.loads(text)
        if user_attrs is None:  # not for summaries (they are few: pruners and TPE read them)
            model = models.TrialIntermediateValueModel
            for tid, step, value, kind in ours(
                joined(_INTERMEDIATE, _INTERMEDIATE.c.step)
                .add_columns(_INTERMEDIATE.c.intermediate_value)
                .add_columns(_INTERMEDIATE.c.intermediate_value_type)  # parsed: they are few
            ):
                trials[tid].intermediate[step] = model.stored_repr_to_intermediate_value(
                    value, kind
                )
    return [parts.trial() for parts in trials.values()]


def _raw(column: Any) -> Any:
    """``column`` as the database returns it: SQLAlchemy's parsing of SQLite's date strings
    and of enums costs more than the rest of a read."""
    return sa.type_coerce(column, sa.String)


class _LocalTime:
    """Optuna stores naive UTC and hands out naive local time (``models.TrialModel`` does
    this). The offset is looked up once per minute of the study (zones change offset on
    whole minutes)."""

    def __init__(self) -> None:
        self._offsets: dict[Any, datetime.timedelta] = {}

    def __call__(self, stamp: Any) -> datetime.datetime | None:
        if stamp is None:
            return None
        if isinstance(stamp, str):  # SQLite: "YYYY-MM-DD HH:MM:SS.ffffff"
            key, stamp = stamp[:16], datetime.datetime.fromisoformat(stamp)
        else:
            key = stamp.replace(second=0, microsecond=0)
        offset = self._offsets.get(key)
        if offset is None:
            minute = stamp.replace(second=0, microsecond=0)
            here = minute.replace(tzinfo=_UTC).astimezone().replace(tzinfo=None)
            offset = self._offsets[key] = here - minute
        return stamp + offset


class _Parts:
    """One trial's rows, gathered before the trial is built."""

    __slots__ = ("row", "values", "params", "distributions", "attrs", "intermediate")

    def __init__(self, *row: Any) -> None:
        self.row = row
        self.values: dict[int, float] = {}
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}
        self.attrs: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        self.intermediate: dict[int, float] = {}

    def trial(self) -> FrozenTrial:
        tid, number, state, start, complete = self.row
        values = [self.values[i] for i in range(len(self.values))] if self.values else None
        return FrozenTrial(
            number=number,
            state=state,
            value=None,
            values=values,
            datetime_start=start,
            datetime_complete=complete,
            params=self.params,
            distributions=self.distributions,
            user_attrs=self.attrs[0],
            system_attrs=self.attrs[1],
            intermediate_values=self.intermediate,
            trial_id=tid,
        )


class LeanRDBStorage(RDBStorage):
    """Optuna's RDB storage, whose reads of many trials (those of Optuna's cache, which every
    ``study.get_trials`` goes through) leave the bulky records of finished trials out
    (``LEAN_DROPS``) and are made with SQLAlchemy Core.

    For processes that run trials, whose loop reads only numbers, states, values, params and
    small attrs of finished trials; :func:`autoprune.study.trials.full_trials` reads a
    trial's whole record from the database. ``get_trial`` (one trial, e.g. the trial that
    just finished, handed to callbacks) is Optuna's, whole.
    """

    def _get_trials(
        self,
        study_id: int,
        states: Any,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        # Optuna's selection (storages/_rdb/storage.py, RDBStorage._get_trials).
        included = {i for i in included_trial_ids if i <= trial_id_greater_than}
        where = None
        if included and trial_id_greater_than > -1:
            where = _TRIALS.c.trial_id.in_(sorted(included)) | (
                _TRIALS.c.trial_id > trial_id_greater_than
            )
        elif trial_id_greater_than > -1:
            where = _TRIALS.c.trial_id > trial_id_greater_than
        with self.engine.connect() as connection:
            found = connection.execute(
                sa.select(models.StudyModel.study_id).where(models.StudyModel.study_id == study_id)
            ).first()
        if found is None:
            raise KeyError(f"No study with study_id {study_id} exists.")
        return read_trials(
            self, study_id, states=None if states is None else list(states), where=where, lean=True
        )


class WindowedStudy:
    """``study`` as a sampler sees it: its trials limited to ``keep(trials, states)``.

    Optuna's samplers read the trials through ``study._get_trials`` (TPE, its search spaces)
    or ``get_trials``; everything else is the study's.
    """

    def __init__(self, study: optuna.Study, keep: Any):
        self._study, self._keep = study, keep

    def _get_trials(
        self, deepcopy: bool = True, states: Any = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=False, states=states, use_cache=use_cache)
        kept = self._keep(trials, states)
        return copy.deepcopy(kept) if deepcopy else kept

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class FixedStudy(WindowedStudy):
    """``study`` holding only ``trials`` (read them only), for Optuna's importance evaluators:
    a study of their own would deep-copy each trial (``add_trials``)."""

    def __init__(self, study: optuna.Study, trials: Sequence[FrozenTrial]):
        super().__init__(study, None)
        self._trials = list(trials)

    def _get_trials(
        self, deepcopy: bool = True, states: Any = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        kept = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(kept) if deepcopy else kept


# Optuna's modules that import scikit-learn (each in its try_import) when optuna.importance
# is imported: fANOVA and mean decrease impurity.
_SKLEARN_USERS = ("optuna.importance._fanova._fanova", "optuna.importance._mean_decrease_impurity")


def importance_package() -> ModuleType:
    """``optuna.importance``, imported without importing scikit-learn until an evaluator that
    needs it (fANOVA, mean decrease impurity) is made.

    The package is imported while scikit-learn cannot be: each module that wants it notes the
    failure, as where it is not installed. Their notes are then replaced by
    :class:`_ImportWhenChecked`: the evaluator's check (made when it is created) imports the
    module again, scikit-learn with it.
    """
    if "optuna.importance" not in sys.modules and "sklearn" not in sys.modules:
        sys.modules["sklearn"] = None  # type: ignore[assignment]  # importing it fails at once
        try:
            importlib.import_module("optuna.importance")
        finally:
            del sys.modules["sklearn"]
        for name in _SKLEARN_USERS:
            module = sys.modules.get(name)
            if module is not None and not getattr(module, "_imports").is_successful():  # noqa: B009
                setattr(module, "_imports", _ImportWhenChecked(module))  # noqa: B010
    return importlib.import_module("optuna.importance")


class _ImportWhenChecked:
    """A module's ``try_import`` of scikit-learn, made when first checked."""

    def __init__(self, module: ModuleType):
        self.module = module

    def _imported(self) -> Any:
        if isinstance(self.module._imports, _ImportWhenChecked):
            importlib.reload(self.module)  # its classes read the module's globals: fixed too
        return self.module._imports

    def check(self) -> None:
        self._imported().check()

    def is_successful(self) -> bool:
        return bool(self._imported().is_successful())
