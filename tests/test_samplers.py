"""Samplers: TPE sees the front and a window of recent trials, so its cost stays flat."""

from __future__ import annotations

import optuna
import pytest

from autoprune.study import samplers
from autoprune.study.front import current_front
from autoprune.study.samplers import WindowedSampler, make_sampler
from autoprune.study.space import SearchSpace


def objective(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    kind = trial.suggest_categorical("kind", ["a", "b"])
    return x * (1.2 if kind == "a" else 1.0), (x - 0.3) ** 2


def tpe(seed: int) -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)


def params_of(sampler: optuna.samplers.BaseSampler, n: int) -> list[dict]:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(objective, n_trials=n)
    return [t.params for t in study.trials]


def test_a_study_within_the_window_is_sampled_as_by_tpe_alone() -> None:
    assert params_of(WindowedSampler(tpe(3), window=30), 30) == params_of(tpe(3), 30)


def test_beyond_the_window_tpe_sees_the_front_and_the_recent_trials() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=tpe(0))
    study.optimize(objective, n_trials=40)
    windowed = WindowedSampler(tpe(0), window=10)
    trial = study.ask()
    seen = windowed._view(study, study._storage.get_trial(trial._trial_id))
    trials = seen._get_trials(deepcopy=False, states=None)
    front = [t.number for t in current_front(study) if t.number < 31]
    assert [t.number for t in trials] == front + list(range(31, 41))  # 40 is running
    waiting = seen.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    assert [t.number for t in waiting] == [40]
    assert seen.directions == study.directions and seen._study_id == study._study_id


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_tpe_by_name_keeps_sampling_beyond_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samplers, "TPE_WINDOW", 12)
    sampler = make_sampler("tpe", seed=1, space=SearchSpace())
    assert isinstance(sampler, WindowedSampler) and sampler.window == 12
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(objective, n_trials=30)
    modelled = [t for t in study.trials if "tpe:relative_params:0" in t.system_attrs]
    assert len(modelled) == 30 - samplers.N_STARTUP_TRIALS
