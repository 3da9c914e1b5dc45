"""The search: an Optuna multi-objective study over pruning policies."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial
from torch import nn

from autoprune._version import __version__
from autoprune.constraints import Constraints
from autoprune.errors import StorageError, TaskError, TrialFailed
from autoprune.heuristics import WarmStart, enqueue_warm_starts
from autoprune.masks import count_nonzero, prunable_layers
from autoprune.objective import DIRECTIONS, METRIC_NAMES, Objective, prune_and_finetune
from autoprune.policy import Policy
from autoprune.samplers import make_sampler
from autoprune.space import SearchSpace
from autoprune.stopping import EarlyStop
from autoprune.task import Task
from autoprune.train import evaluate

logger = logging.getLogger(__name__)

# Key of the study user attr holding what the study was created with.
STUDY_ATTR = "autoprune"
Callback = Callable[[optuna.Study, FrozenTrial], None]
# The sampler of a study whose spec names none (see autoprune.samplers.SAMPLERS).
DEFAULT_SAMPLER = "tpe"


def search(
    task: Task,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    seed: int = 0,
    space: SearchSpace | None = None,
    sampler: optuna.samplers.BaseSampler | str | None = None,
    warm_start: WarmStart | None = None,
    constraints: Constraints | None = None,
    early_stop: EarlyStop | None = None,
    callbacks: Iterable[Callback] = (),
) -> optuna.Study:
    """Search pruning policies of ``task.model``; return the (new or resumed) Optuna study.

    Objectives: maximise validation accuracy, minimise nonzero prunable weights. The Pareto
    front is ``study.best_trials``; :func:`autoprune.pareto_front` tabulates it.

    Args:
        n_trials: Trials to run in this call (None: until ``timeout``).
        timeout: Seconds after which no new trial starts.
        storage: Optuna storage or database URL; None keeps the study in memory.
        study_name: Name of the study; an existing study of that name is resumed.
        seed: Seeds the sampler and every trial's fine-tuning.
        space: The search space; :class:`SearchSpace` defaults if None.
        sampler: A sampler, or the name of one in :data:`autoprune.samplers.SAMPLERS`
            (seeded); None: ``DEFAULT_SAMPLER``.
        warm_start: Heuristic policies a new study tries first (``WarmStart()``: LAMP, global
            magnitude and ERK over a spread of sparsities, the spec's default); None: none.
        constraints: Bounds on accuracy and size; infeasible trials leave the front.
        early_stop: Stops hopeless trials after their first epoch (state PRUNED); None: never.
        callbacks: Called as ``callback(study, trial)`` after each trial.

    Raises:
        TaskError: If the model has no prunable layer left by the space's globs, or the data
            does not fit the model.
        StorageError: If the storage cannot be opened, or the named study was created with a
            different task, search space or seed.
    """
    space = space or SearchSpace()
    _check_budget(n_trials, timeout)
    study = open_study(
        task,
        space=space,
        storage=storage,
        study_name=study_name,
        seed=seed,
        sampler=sampler,
        warm_start=warm_start,
    )
    optimize(
        study,
        task,
        n_trials=n_trials,
        timeout=timeout,
        callbacks=callbacks,
        constraints=constraints,
        early_stop=early_stop,
    )
    return study


def optimize(
    study: optuna.Study,
    task: Task,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    callbacks: Iterable[Callback] = (),
    constraints: Constraints | None = None,
    early_stop: EarlyStop | None = None,
) -> None:
    """Run trials of an opened study (see :func:`open_study`) with the space stored in it;
    ``constraints`` and ``early_stop`` as in :func:`search`."""
    _check_budget(n_trials, timeout)
    setup = study.user_attrs[STUDY_ATTR]
    space = SearchSpace.from_dict(setup["space"])
    objective = Objective(
        task,
        space,
        setup["layers"],
        seed=setup["seed"],
        constraints=constraints,
        early_stop=early_stop,
    )
    study.optimize(
        objective,
        n_trials=n_trials,
        timeout=timeout,
        catch=(TrialFailed,),
        callbacks=list(callbacks),
    )


def _check_budget(n_trials: int | None, timeout: float | None) -> None:
    if n_trials is None and timeout is None:
        raise ValueError("give n_trials or timeout, or the search never ends")


def open_study(
    task: Task,
    *,
    space: SearchSpace,
    storage: str | optuna.storages.BaseStorage | None,
    study_name: str | None,
    seed: int,
    sampler: optuna.samplers.BaseSampler | str | None = None,
    warm_start: WarmStart | None = None,
) -> optuna.Study:
    """Create the study, or load it if it exists and was made with the same setup.

    A new study gets the warm-start trials (see :func:`search`) enqueued first; a sampler
    given by name is seeded with ``seed`` plus the trials already run, so that a resumed run
    does not replay the first run's random draws.

    Everything about the task is checked before the storage is touched, so bad input leaves
    no half-written study behind.

    Raises:
        TaskError: If the model has no prunable layer left by the space's globs, or the data
            does not fit the model.
        StorageError: If the storage cannot be opened, or the named study was created with a
            different task, fine-tuning recipe, search space or seed.
    """
    layers = prunable_layers(task.model, space.include, space.exclude)
    task.check()
    setup = {
        "version": __version__,
        "task": task.name,
        "finetune": {
            "epochs": task.finetune_epochs,
            "lr": task.lr,
            "batch_size": task.batch_size,
            "calibration_batches": task.calibration_batches,
        },
        "layers": layers,
        "space": space.to_dict(),
        "seed": seed,
        "model": model_fingerprint(task.model),
    }
    storage = _open_storage(storage, for_writing=True)
    existing = _load_existing(storage, study_name)
    if existing is not None:
        _check_same_setup(existing, setup, study_name)
    n_before = len(existing.trials) if existing is not None else 0
    dense = dense_metrics(task, layers) if existing is None else None
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        sampler = make_sampler(sampler or DEFAULT_SAMPLER, seed=seed + n_before, space=space)
    with _storage_errors(storage):
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            sampler=sampler,
            directions=DIRECTIONS,
            load_if_exists=True,
        )
    if existing is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(METRIC_NAMES))
        study.set_user_attr(STUDY_ATTR, {**setup, "dense": dense})
        if warm_start is not None:
            enqueue_warm_starts(study, task, space, layers, warm_start)
    return study


def dense_metrics(task: Task, layers: list[str]) -> dict[str, float]:
    """Validation (and test) accuracy, nonzero and total prunable weights of the dense model."""
    metrics = {"accuracy": evaluate(task.model, task, "val")[0]}
    if task.test is not None:
        metrics["test_accuracy"] = evaluate(task.model, task, "test")[0]
    nonzero, total = count_nonzero(task.model, layers)
    metrics["nonzero_params"], metrics["total_params"] = float(nonzero), float(total)
    return metrics


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's state dict: the same trained weights give the same hash."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def materialize(task: Task, trial: FrozenTrial) -> nn.Module:
    """Rebuild the pruned, fine-tuned model of a finished trial (masks folded in).

    The replay is seeded and deterministic: the model reproduces the trial's recorded
    metrics exactly (given the same task, on the same kind of machine).

    Raises:
        TaskError: If ``trial`` holds no autoprune policy or its layers are not in the model.
    """
    if "policy" not in trial.user_attrs or "seed" not in trial.user_attrs:
        raise TaskError(f"trial {trial.number} holds no autoprune policy")
    policy = Policy.from_dict(trial.user_attrs["policy"])
    missing = set(policy.sparsity) - {name for name, _ in task.model.named_modules()}
    if missing:
        raise TaskError(
            f"trial {trial.number} prunes layer {sorted(missing)[0]!r}, "
            "which the task's model does not have"
        )
    result = prune_and_finetune(task, policy, seed=trial.user_attrs["seed"])
    if trial.values is not None and result.metrics["accuracy"] != trial.values[0]:
        logger.warning(
            "trial %d replayed to val accuracy %.6f, not the recorded %.6f: is this the task "
            "the study searched (same model weights, data, recipe and torch thread count)?",
            trial.number,
            result.metrics["accuracy"],
            trial.values[0],
        )
    return result.model


def load_study(storage: str, study_name: str | None) -> optuna.Study:
    """Load an existing autoprune study; with one study in the storage, the name may be omitted.

    Raises:
        StorageError: If the storage cannot be opened, holds no such study, or the study was
            not made by autoprune.
    """
    if _missing_sqlite_file(storage):  # opening it would leave an empty database behind
        raise StorageError(f"storage {_describe(storage)} does not exist")
    storage = _open_storage(storage)
    with _storage_errors(storage):
        names = optuna.get_all_study_names(storage)
    if study_name is None:
        if len(names) != 1:
            listed = ", ".join(names) if names else "none"
            raise StorageError(
                f"give --study-name: storage {_describe(storage)} holds "
                f"{len(names)} studies ({listed})"
            )
        study_name = names[0]
    if study_name not in names:
        raise StorageError(f"no study named {study_name!r} in {_describe(storage)}")
    study = optuna.load_study(study_name=study_name, storage=storage)
    if STUDY_ATTR not in study.user_attrs:
        raise StorageError(f"study {study_name!r} was not made by autoprune")
    return study


def _open_storage(storage: Any, *, for_writing: bool = False) -> Any:
    """A URL becomes a storage object, opened once for all that follows.

    A SQLite file opened for writing is switched to write-ahead logging (see
    :func:`_sqlite_pragmas`); read-only commands leave the file as they find it.
    """
    if not isinstance(storage, str):
        return storage
    with _storage_errors(storage):
        opened = optuna.storages.RDBStorage(storage)
    if for_writing and opened.engine.name == "sqlite":
        sqlalchemy.event.listen(opened.engine, "connect", _sqlite_pragmas)
        opened.engine.dispose()  # reconnect, so that every pooled connection gets the pragmas
    return opened


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # A trial makes ~17 small commits. With WAL and synchronous=NORMAL a commit does not wait
    # for the disk (measured: 2.6 -> 1.2 ms per user attr), and readers such as `autoprune
    # report` do not block the search. A killed process loses nothing committed; a power cut
    # may lose the last commits but never corrupts the file. WAL needs a local file system.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _load_existing(storage: Any, study_name: str | None) -> optuna.Study | None:
    if storage is None or study_name is None:
        return None
    with _storage_errors(storage):
        if study_name not in optuna.get_all_study_names(storage):
            return None
        return optuna.load_study(study_name=study_name, storage=storage)


def _check_same_setup(study: optuna.Study, setup: dict[str, Any], name: str | None) -> None:
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        raise StorageError(f"study {name!r} exists but was not made by autoprune")
    stored = dict(stored)
    if "space" in stored:  # spaces stored before a key was added compare with its default
        stored["space"] = SearchSpace.from_dict(stored["space"]).to_dict()
    for key in [k for k in setup if k != "version"]:  # what a study was made with
        if stored.get(key) != setup[key]:
            label = "dense model weights (fingerprint)" if key == "model" else key
            hint = (
                "resume with the model the study was made with, or use another study name"
                if key == "model"
                else "use another study name to search a different setup"
            )
            raise StorageError(
                f"study {name!r} was created with {label} {stored.get(key)!r}, not "
                f"{setup[key]!r}; {hint}"
            )


def _missing_sqlite_file(storage: Any) -> bool:
    if not isinstance(storage, str) or not storage.startswith("sqlite:"):
        return False
    try:
        database = sqlalchemy.engine.make_url(storage).database
    except Exception:  # a malformed URL: let Optuna say what is wrong with it
        return False
    return database not in (None, "", ":memory:") and not Path(database).exists()


@contextmanager
def _storage_errors(storage: Any) -> Iterator[None]:
    """Turn whatever the storage layer raises into one-line StorageErrors naming the URL."""
    try:
        yield
    except Exception as e:
        raise StorageError(f"cannot open storage {_describe(storage)}: {_first_line(e)}") from e


def _describe(storage: Any) -> str:
    """The storage's URL with any password hidden, for messages."""
    url = storage if isinstance(storage, str) else getattr(storage, "url", None)
    if url is None:
        return type(storage).__name__
    try:
        return repr(sqlalchemy.engine.make_url(url).render_as_string(hide_password=True))
    except Exception:  # not a URL SQLAlchemy can parse: say it as given
        return repr(url)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
