"""Reading trials at scale: autoprune's reads of Optuna's tables give what Optuna's own give."""

from __future__ import annotations

import datetime
import os
import random
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

from autoprune.study import _optuna
from autoprune.study.storages import open_storage
from autoprune.study.trials import full_trial, full_trials, trial_summaries, whole

FIELDS = (
    "number",
    "state",
    "values",
    "params",
    "distributions",
    "user_attrs",
    "system_attrs",
    "intermediate_values",
    "datetime_start",
    "datetime_complete",
    "_trial_id",
)
START = datetime.datetime(2025, 3, 30, 0, 30)  # Central Europe moves its clocks at 1:00 UTC


def made_trial(rng: random.Random, number: int) -> FrozenTrial:
    """A trial of any state, with params of each kind, attrs, constraints, odd values."""
    state = rng.choice([*TrialState])
    finished = state.is_finished()
    values = None
    if state == TrialState.COMPLETE:
        values = [rng.choice([rng.random(), float("inf"), float("-inf")]), float(number)]
    params = {"c": rng.choice(["a", "b"]), "f": rng.uniform(0, 1), "i": rng.randint(1, 9)}
    system: dict[str, object] = {"tpe:relative_params:0": '{"f": 0.5}', "fixed_params": {}}
    if rng.random() < 0.3:
        system["constraints:accuracy"] = rng.uniform(-1, 1)
    if rng.random() < 0.2:
        system["constraints"] = [rng.uniform(-1, 1)]  # Optuna's older form
    if rng.random() < 0.2:
        system["retry_history"] = [max(0, number - 1)]
    trial = create_trial(
        state=state,
        values=values,
        params=params,
        distributions={
            "c": CategoricalDistribution(["a", "b"]),
            "f": FloatDistribution(0, 1),
            "i": IntDistribution(1, 9),
        },
        user_attrs={
            "policy": {"criterion": "magnitude", "sparsity": {"x": 0.5}},
            "history": {"train": [[0.5, 1.0]], "val": [[0.0, 2.0]]},
            "density": rng.random(),
            "worker": "host:1",
            "zeta": None,
        },
        system_attrs=system,
        intermediate_values={0: 0.5, 1: float("nan")} if state == TrialState.PRUNED else {},
    )
    trial.datetime_start = START + datetime.timedelta(minutes=7 * number)
    trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=30)
    if not finished:
        trial.datetime_complete = None
    if state == TrialState.WAITING:
        trial.datetime_start = None
    return trial


@pytest.fixture(params=["UTC", "Europe/Berlin", "America/St_Johns"])
def local_zone(request: pytest.FixtureRequest) -> object:
    """Optuna hands out naive local times: read them in zones that change their offset (the
    trials span the end of winter time)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    yield request.param
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize", "minimize"]
    )
    rng = random.Random(0)
    study.add_trials([made_trial(rng, i) for i in range(60)])
    return study


def same(ours: list[FrozenTrial], theirs: list[FrozenTrial]) -> None:
    assert [t.number for t in ours] == [t.number for t in theirs]
    for a, b in zip(ours, theirs, strict=True):
        for field in FIELDS:  # repr: nan == nan, and dicts in the same order
            assert repr(getattr(a, field)) == repr(getattr(b, field)), (a.number, field)


def test_read_trials_is_what_optuna_reads(study: optuna.Study, local_zone: object) -> None:
    storage = _optuna.rdb_storage(study)
    assert storage is not None
    theirs = optuna.load_study(study_name=study.study_name, storage=storage.url).trials
    same(_optuna.read_trials(storage, _optuna.study_id(study)), theirs)
    some = _optuna.read_trials(storage, _optuna.study_id(study), numbers=[3, 1, 40, 99])
    same(some, [theirs[1], theirs[3], theirs[40]])


def test_summaries_hold_what_was_asked(study: optuna.Study) -> None:
    theirs = optuna.load_study(study_name=study.study_name, storage=study._storage._backend.url)
    summaries = trial_summaries(study, user_attrs=("density",))
    complete = trial_summaries(study, states=[TrialState.COMPLETE])
    assert [t.number for t in summaries] == list(range(60))
    assert [t.number for t in complete] == [
        t.number for t in theirs.trials if t.state == TrialState.COMPLETE
    ]
    for ours, trial in zip(summaries, theirs.trials, strict=True):
        assert (ours.state, repr(ours.values), ours.datetime_start) == (
            trial.state,
            repr(trial.values),
            trial.datetime_start,
        )
        assert ours.user_attrs == {"density": trial.user_attrs["density"]}
        assert ours.params == {} and ours.constraints == trial.constraints
        assert set(ours.system_attrs) <= {"constraints", "constraints:accuracy", "retry_history"}
    same(full_trials(study, [5, 2]), [theirs.trials[2], theirs.trials[5]])
    assert full_trial(study, 60) is None


def test_other_storages_are_read_through_optuna() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    rng = random.Random(1)
    study.add_trials([made_trial(rng, i) for i in range(10)])
    stored = study.get_trials(deepcopy=False)
    assert trial_summaries(study) == stored
    assert full_trials(study, [4, 1]) == [stored[1], stored[4]]
    assert all(a is b for a, b in zip(full_trials(study, [1]), [stored[1]], strict=True))


def test_a_lean_storage_reads_as_optuna_without_the_bulky_records(
    study: optuna.Study, local_zone: object
) -> None:
    """The cache of a trial-running process: every trial as Optuna reads it, finished ones
    without loss curves, policy, timings, per-layer sparsity and TPE's relative params."""
    url = study._storage._backend.url
    plain, lean = RDBStorage(url), _optuna.LeanRDBStorage(url)
    sid = _optuna.study_id(study)
    for states in (None, [TrialState.COMPLETE], [TrialState.RUNNING, TrialState.WAITING]):
        for included, greater in ((set(), -1), ({5, 9, 70}, 30), (set(), 55)):
            ours = lean._get_trials(sid, states, included, greater)
            theirs = plain._get_trials(sid, states, included, greater)
            for trial in theirs:
                if trial.state.is_finished():
                    trial.system_attrs.pop("tpe:relative_params:0")
                    trial.user_attrs.pop("history")
                    trial.user_attrs.pop("policy")
            same(ours, theirs)
            unfinished = [t for t in ours if not t.state.is_finished()]
            assert all("history" in t.user_attrs for t in unfinished)
            assert not any("history" in t.user_attrs for t in ours if t.state.is_finished())
    with pytest.raises(KeyError):
        lean._get_trials(sid + 1, None, set(), -1)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_a_trial_running_process_reads_lean_and_search_returns_whole(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    optuna.create_study(storage=url, study_name="w", directions=["maximize", "minimize"])
    running = optuna.load_study(study_name="w", storage=open_storage(url, for_writing=True))
    for i in range(3):
        trial = running.ask()
        trial.set_user_attr("policy", {"criterion": "magnitude"})
        trial.set_user_attr("density", 0.5)
        if i < 2:
            running.tell(trial, [0.5, 10.0 + i])
    cached = running.get_trials(deepcopy=False)
    assert [sorted(t.user_attrs) for t in cached] == [["density"]] * 2 + [["density", "policy"]]
    assert all("policy" in t.user_attrs for t in full_trials(running, [0, 1, 2]))
    assert all("policy" in t.user_attrs for t in whole(running).trials)
    plain = optuna.create_study()
    assert whole(plain) is plain


@pytest.mark.parametrize("states", [None, [TrialState.COMPLETE]])
def test_a_trial_written_during_a_read_is_left_out(
    study: optuna.Study, states: list[TrialState] | None
) -> None:
    """Another worker adds a trial, with values, params and attrs, between the read's first
    query (the trials) and the next ones: on PostgreSQL each query sees what is committed by
    then, and the read failed with ``KeyError: <trial id>`` (a race test caught it)."""
    storage = _optuna.rdb_storage(study)
    assert storage is not None
    with storage.engine.connect() as connection:  # readers and a writer at once, as on PG
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    writer = optuna.load_study(study_name=study.study_name, storage=storage.url)
    queries: list[str] = []

    def after_the_first_query(*args: object) -> None:
        queries.append("select")
        if len(queries) == 1:
            writer.add_trial(made_trial(random.Random(1), 60))  # a complete one, seed 1

    sqlalchemy.event.listen(storage.engine, "after_cursor_execute", after_the_first_query)
    try:
        ours = _optuna.read_trials(storage, _optuna.study_id(study), states=states)
    finally:
        sqlalchemy.event.remove(storage.engine, "after_cursor_execute", after_the_first_query)
    assert len(queries) > 1 and len(study.get_trials(deepcopy=False)) == 61
    theirs = [t for t in study.get_trials()[:60] if states is None or t.state in states]
    same(ours, theirs)
