"""Samplers by name, always built explicitly and seeded (Optuna's defaults changed in 5.0).

Constraints are not passed here: the objective records them with ``trial.set_constraint``,
which TPE, NSGA-II and GP read from the trials themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import optuna

from autoprune._registry import Registry
from autoprune.study.space import SearchSpace

SamplerFactory = Callable[[int, SearchSpace], optuna.samplers.BaseSampler]

# Random trials before a model-based sampler starts modelling (warm starts count as trials).
N_STARTUP_TRIALS = 10


def _tpe(seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # `group` is experimental, and needed for our spaces
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: parallel workers do not all propose what the others are running.
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            group=True,
            n_startup_trials=N_STARTUP_TRIALS,
            constant_liar=True,
        )


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
