"""Samplers by name, always built explicitly and seeded (Optuna's defaults changed in 5.0).

Constraints are not passed here: the objective records them with ``trial.set_constraint``,
which TPE, NSGA-II and GP read from the trials themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from autoprune._registry import Registry
from autoprune.study import _optuna
from autoprune.study.front import current_front
from autoprune.study.space import SearchSpace

SamplerFactory = Callable[[int, SearchSpace], optuna.samplers.BaseSampler]

# Random trials before a model-based sampler starts modelling (warm starts count as trials).
N_STARTUP_TRIALS = 10
# Trials TPE models, besides the front: the most recent ones. TPE's cost per trial grows with
# the trials it reads (its split of good and bad trials, its kernels, its search space), so a
# night of trials slowed each later trial down; with the window it stays what it is at this
# size (measured in scripts/bench_scale.py). The front is always modelled: the good trials
# of the whole study stay TPE's "good" ones.
TPE_WINDOW = 300


class WindowedSampler(optuna.samplers.BaseSampler):
    """``sampler``, shown the study's current front and its ``window`` most recent trials
    (of the states it asks for) instead of every trial. Studies of at most ``window`` trials
    are sampled exactly as ``sampler`` alone samples them.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, window: int):
        self.sampler, self.window = sampler, window
        self._front: tuple[int, list[FrozenTrial]] = (-1, [])  # (for trial, front)

    def _view(self, study: optuna.Study, trial: FrozenTrial) -> Any:
        return _optuna.WindowedStudy(
            study, lambda trials, states: self._keep(study, trial, trials, states)
        )

    def _keep(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        trials: Sequence[FrozenTrial],
        states: Container[TrialState] | None,
    ) -> list[FrozenTrial]:
        if len(trials) <= self.window:
            return list(trials)
        recent = list(trials[-self.window :])
        first = recent[0].number
        if states is not None and TrialState.COMPLETE not in states:
            return recent
        if self._front[0] != trial.number:  # once per trial: the sampler asks several times
            self._front = (trial.number, current_front(study))
        older = [t for t in self._front[1] if t.number < first]
        return older + recent

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.sampler.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self.sampler.sample_independent(
            self._view(study, trial), trial, param_name, param_distribution
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def _tpe(seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # `group` is experimental, and needed for our spaces
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: parallel workers do not all propose what the others are running.
        tpe = optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            group=True,
            n_startup_trials=N_STARTUP_TRIALS,
            constant_liar=True,
        )
    return WindowedSampler(tpe, TPE_WINDOW)


def _nsga2(seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)


def _gp(seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    # The per-layer space is conditional (scope, rule): GP models only the params that every
    # trial has, and draws the others at random, without a warning per trial.
    return optuna.samplers.GPSampler(
        seed=seed,
        n_startup_trials=N_STARTUP_TRIALS,
        independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        warn_independent_sampling=False,
    )


def _random(seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _auto(seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """TPE. On scripts/bench_search.py (allocation parametrization, seed 0, 60 trials) it had
    the highest hypervolume on both tasks (digits-cnn: TPE 1.435, GP 1.359, NSGA-II 1.339,
    random 1.327), and GP took 5x its wall time on a CPU."""
    return _tpe(seed, space)


SAMPLERS: Registry[SamplerFactory] = Registry(
    "sampler", {"tpe": _tpe, "nsga2": _nsga2, "gp": _gp, "random": _random, "auto": _auto}
)


def make_sampler(name: str, *, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (a key of :data:`SAMPLERS`), seeded with ``seed``.

    Raises:
        SpecError: If ``name`` is not a known sampler.
    """
    return SAMPLERS.get(name)(seed, space)
