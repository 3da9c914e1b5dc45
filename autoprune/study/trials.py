"""Reading a study's trials at overnight size: every trial light, the trials shown whole.

Counts, fronts, pace and hypervolume need each trial's number, state, values and a few small
attrs; a table or a page shows the whole record (policy, loss curves, per-layer sparsity) of a
few trials only. :func:`trial_summaries` and :func:`full_trials` read just that. In a
database, they read Optuna's tables directly (:func:`autoprune.study._optuna.read_trials`: a
summary of 10,000 trials takes a fraction of a second where ``study.get_trials`` takes tens);
other storages (in memory, journal files) hold every trial in memory already, and are read
with ``study.get_trials``.

Summaries are :class:`optuna.trial.FrozenTrial` objects that hold only what was asked for:
read them for their numbers, states, values, times, constraints and the attrs named.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.study import _optuna


def trial_summaries(
    study: optuna.Study,
    *,
    user_attrs: Collection[str] = (),
    states: Collection[TrialState] | None = None,
    numbers: Collection[int] | None = None,
    params: bool = False,
) -> list[FrozenTrial]:
    """The study's trials (those in ``states`` and ``numbers``; None: all), in number order,
    with their numbers, states, values, times and constraints, of their user attrs only
    ``user_attrs``, and their params if ``params``. Other storages than databases give whole
    trials."""
    storage = _optuna.rdb_storage(study)
    if storage is None or _cache_serves(study, user_attrs):
        trials = study.get_trials(deepcopy=False, states=None if states is None else tuple(states))
        wanted = None if numbers is None else set(numbers)
        return trials if wanted is None else [t for t in trials if t.number in wanted]
    return _optuna.read_trials(
        storage,
        _optuna.study_id(study),
        numbers=numbers,
        states=states,
        user_attrs=user_attrs,
        params=params,
    )


def full_trials(study: optuna.Study, numbers: Iterable[int]) -> list[FrozenTrial]:
    """The whole trials of these numbers (all that exist), in number order. Read them only:
    they may be the storage's own."""
    # A number no database integer holds names no trial (and would make the driver raise).
    wanted = {n for n in numbers if 0 <= n < _MAX_NUMBER}
    if not wanted:
        return []
    storage = _optuna.rdb_storage(study)
    if storage is None:
        return [t for t in study.get_trials(deepcopy=False) if t.number in wanted]
    return _optuna.read_trials(storage, _optuna.study_id(study), numbers=wanted)


_MAX_NUMBER = 2**63  # trial numbers are 64-bit signed integers in every storage


def full_trial(study: optuna.Study, number: int) -> FrozenTrial | None:
    """The whole trial ``number``, or None if the study has none of that number."""
    found = full_trials(study, [number])
    return found[0] if found else None


def check_numbered(trials: Sequence[FrozenTrial]) -> None:
    """Check that ``trials`` are a study's trials in number order, as ``get_trials`` gives
    them (trial ``i`` at index ``i``), which code that finds a trial by its number needs.

    Raises:
        ValueError: If they are not.
    """
    if trials and trials[-1].number != len(trials) - 1:
        raise ValueError(
            f"not a study's trials in number order: {len(trials)} trials end with "
            f"trial {trials[-1].number}"
        )


def _cache_serves(study: optuna.Study, user_attrs: Collection[str]) -> bool:
    """Whether the study's own cache answers as well as a read: a trial-running process
    (lean storage) holds every trial, current as of its last read, and reading it again costs
    only the trials that changed since."""
    storage = _optuna.rdb_storage(study)
    lean = isinstance(storage, _optuna.LeanRDBStorage)
    return lean and not set(user_attrs) & set(_optuna.LEAN_DROPS)


def whole(study: optuna.Study) -> optuna.Study:
    """``study`` with a storage whose trials are whole: the study itself, or, if it was opened
    to run trials (lean, see :func:`autoprune.study.storages.open_rdb`), the same study
    loaded again (for the caller of :func:`autoprune.search`, who may read any trial)."""
    storage = _optuna.rdb_storage(study)
    if not isinstance(storage, _optuna.LeanRDBStorage):
        return study
    return optuna.load_study(
        study_name=study.study_name,
        storage=optuna.storages.RDBStorage(storage.url, engine_kwargs=storage.engine_kwargs),
        sampler=study.sampler,
    )
