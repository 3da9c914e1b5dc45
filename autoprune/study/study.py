"""The search: an Optuna multi-objective study over pruning policies."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from torch import nn

from autoprune import measure
from autoprune._version import __version__
from autoprune.errors import StorageError, TaskError, TrialFailed
from autoprune.pruning import structured
from autoprune.pruning.masks import count_nonzero, prunable_layers
from autoprune.pruning.policy import Policy
from autoprune.study import storages
from autoprune.study.artifacts import ArtifactSpec, FrontWeights
from autoprune.study.constraints import Constraints
from autoprune.study.front_table import FrontTable
from autoprune.study.objective import METRIC_NAMES, Objective
from autoprune.study.samplers import make_sampler
from autoprune.study.setup import check_same_setup, structured_setup
from autoprune.study.space import SearchSpace
from autoprune.study.stopping import EarlyStop
from autoprune.study.warm_start import WarmStart, enqueue_warm_starts
from autoprune.task import Task
from autoprune.train import evaluate
from autoprune.trial import PruneResult, prune_and_finetune

logger = logging.getLogger(__name__)

# Key of the study user attr holding what the study was created with.
STUDY_ATTR = "autoprune"
Callback = Callable[[optuna.Study, FrozenTrial], None]
# The sampler of a study whose spec names none (see autoprune.study.samplers.SAMPLERS).
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
    artifacts: ArtifactSpec | None = None,
    front_table: bool = True,
    objectives: Sequence[str] = METRIC_NAMES,
    latency: measure.Latency | None = None,
) -> optuna.Study:
    """Search pruning policies of ``task.model``; return the (new or resumed) Optuna study.

    Objectives: maximise validation accuracy, minimise the size objectives named in
    ``objectives`` (nonzero prunable weights by default). The Pareto front is
    ``study.best_trials``; :func:`autoprune.pareto_front` tabulates it.

    Args:
        n_trials: Trials to run in this call (None: until ``timeout``).
        timeout: Seconds after which no new trial starts.
        storage: Optuna storage or database URL; None keeps the study in memory.
        study_name: Name of the study; an existing study of that name is resumed.
        seed: Seeds the sampler and every trial's fine-tuning.
        space: The search space; :class:`SearchSpace` defaults if None.
        sampler: A sampler, or the name of one in :data:`autoprune.study.samplers.SAMPLERS`
            (seeded); None: ``DEFAULT_SAMPLER``.
        warm_start: Heuristic policies a new study tries first (``WarmStart()``: LAMP, global
            magnitude and ERK over a spread of sparsities, the spec's default); None: none.
        constraints: Bounds on accuracy and size; infeasible trials leave the front.
        early_stop: Stops hopeless trials after their first epoch (state PRUNED); None: never.
        callbacks: Called as ``callback(study, trial)`` after each trial.
        artifacts: Where the weights of front trials are kept (see
            :class:`autoprune.study.artifacts.ArtifactSpec`; default: next to a SQLite file).
        front_table: Keep the ``autoprune_front`` table of a database storage up to date.
        objectives: ``"accuracy"``, then one or two of :data:`autoprune.measure.OBJECTIVES`.
        latency: How ``latency_ms`` is measured (batch size, threads, repeats).

    Raises:
        SpecError: On bad objectives, or unstructured pruning with an objective blind to it.
        TaskError: If the model has no prunable layer left by the space's globs, or the data
            does not fit the model.
        StorageError: If the storage cannot be opened, or the named study was created with a
            different task, search space or seed.
    """
    space = space or SearchSpace()
    artifacts = artifacts or ArtifactSpec()
    _check_budget(n_trials, timeout)
    study = open_study(
        task,
        space=space,
        storage=storage,
        study_name=study_name,
        seed=seed,
        sampler=sampler,
        objectives=objectives,
        latency=latency,
        warm_start=warm_start,
    )
    optimize(
        study,
        task,
        n_trials=n_trials,
        timeout=timeout,
        callbacks=callbacks,
        artifacts=artifacts,
        front_table=front_table,
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
    artifacts: ArtifactSpec | None = None,
    front_table: bool = True,
    constraints: Constraints | None = None,
    early_stop: EarlyStop | None = None,
) -> None:
    """Run trials of an opened study (see :func:`open_study`) with the space stored in it.

    The weights of front trials are kept by ``artifacts`` (see :func:`search`), and a
    database storage gets the ``autoprune_front`` table after each trial (``front_table``);
    ``constraints`` and ``early_stop`` as in :func:`search`.
    """
    _check_budget(n_trials, timeout)
    objective, ours = study_objective(
        study,
        task,
        artifacts=artifacts,
        front_table=front_table,
        constraints=constraints,
        early_stop=early_stop,
    )
    study.optimize(
        objective,
        n_trials=n_trials,
        timeout=timeout,
        catch=(TrialFailed,),
        callbacks=[*ours, *callbacks],
    )


def study_objective(
    study: optuna.Study,
    task: Task,
    *,
    artifacts: ArtifactSpec | None = None,
    front_table: bool = True,
    constraints: Constraints | None = None,
    early_stop: EarlyStop | None = None,
) -> tuple[Objective, list[Callback]]:
    """The objective of an opened study (its stored space, layers, seed and objectives, with
    ``constraints`` and ``early_stop``), and the callbacks that keep its side products
    current: front weights and the ``autoprune_front`` table. The callbacks go before the
    user's, who may read what they write."""
    setup = study.user_attrs[STUDY_ATTR]
    space = SearchSpace.from_dict(setup["space"])
    latency = setup.get("latency")
    weights = FrontWeights.for_study(study, artifacts or ArtifactSpec())
    table = FrontTable.for_study(study) if front_table else None
    objective = Objective(
        task,
        space,
        setup["layers"],
        seed=setup["seed"],
        objectives=setup.get("objectives", METRIC_NAMES),
        latency=measure.Latency.from_dict(latency) if latency else None,
        groups=setup.get("groups", ()),
        blocks=setup.get("blocks", ()),
        on_result=weights.upload if weights is not None else None,
        constraints=constraints,
        early_stop=early_stop,
    )
    if table is not None:
        table.write(study)  # a resumed study's table is current before its first new trial
    return objective, [c for c in (weights, table) if c is not None]


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
    spec: dict[str, Any] | None = None,
    heartbeat: int | None = storages.HEARTBEAT,
    objectives: Sequence[str] = METRIC_NAMES,
    latency: measure.Latency | None = None,
    warm_start: WarmStart | None = None,
    budget: int | None = None,
) -> optuna.Study:
    """Create the study, or load it if it exists and was made with the same setup.

    A new study gets the warm-start trials (see :func:`search`) enqueued first; a sampler
    given by name is seeded with ``seed`` plus the trials already run, so that a resumed run
    does not replay the first run's random draws.

    Everything about the task is checked before the storage is touched, so bad input leaves
    no half-written study behind.

    Args:
        spec: The run's study spec (:meth:`autoprune.spec.StudySpec.to_dict`), stored with
            the study together with this autoprune version, so that workers can join it
            without a file (see :mod:`autoprune.run.worker`); each run stores its own.
        heartbeat: Seconds between heartbeats of running trials, for an RDB URL (None: no
            heartbeats); see :mod:`autoprune.study.storages`.
        warm_start: Heuristic trials enqueued when the study is created (see :func:`search`).
        budget: The trials the study is to run, if known: warm starts take at most half.

    Raises:
        SpecError: On bad objectives, or unstructured pruning with an objective blind to it.
        TaskError: If the model has no prunable layer left by the space's globs, or the data
            does not fit the model.
        StorageError: If the storage cannot be opened, or the named study was created with a
            different task, fine-tuning recipe, search space or seed.
    """
    objectives = list(measure.check_objectives(objectives))
    measure.check_granularities(objectives, space.granularities)
    layers = prunable_layers(task.model, space.include, space.exclude)
    task.check()
    setup: dict[str, Any] = {
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
        "objectives": objectives,
        **structured_setup(task, space),
    }
    if "latency_ms" in objectives:
        setup["latency"] = (latency or measure.Latency()).to_dict()
    storage = storages.open_storage(storage, for_writing=True, heartbeat=heartbeat)
    existing = _load_existing(storage, study_name)
    if existing is not None:
        check_same_setup(existing.user_attrs.get(STUDY_ATTR), setup, study_name)
    n_before = len(existing.trials) if existing is not None else 0
    dense = None
    if existing is None:
        context = measure.Context(
            structured.example_input(task.val)[:1], tuple(layers), latency or measure.Latency()
        )
        dense = dense_metrics(task, layers, objectives=objectives, context=context)
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        # A resumed run must not replay the first run's random draws.
        sampler = make_sampler(sampler or DEFAULT_SAMPLER, seed=seed + n_before, space=space)
    with storages.storage_errors(storage):
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            sampler=sampler,
            directions=measure.directions(objectives),
            load_if_exists=True,
        )
    if existing is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(objectives)
        study.set_user_attr(STUDY_ATTR, {**setup, "dense": dense})
    if spec is not None:  # the version and spec of the latest run, which workers must match
        stored = study.user_attrs[STUDY_ATTR]
        study.set_user_attr(STUDY_ATTR, {**stored, "version": __version__, "spec": spec})
    if existing is None and warm_start is not None:
        # Warm starts take at most half of a known budget: the rest is the search's.
        limit = None if budget is None else max(1, budget // 2)
        enqueue_warm_starts(
            study,
            task,
            space,
            layers,
            warm_start,
            groups=setup.get("groups", ()),
            blocks=setup.get("blocks", ()),
            limit=limit,
        )
    return study


def dense_metrics(
    task: Task,
    layers: list[str],
    *,
    objectives: Sequence[str] = (),
    context: measure.Context | None = None,
) -> dict[str, float]:
    """Validation (and test) accuracy, nonzero and total prunable weights of the dense model,
    and its size ``objectives`` measured in ``context``."""
    metrics = {"accuracy": evaluate(task.model, task, "val")[0]}
    if task.test is not None:
        metrics["test_accuracy"] = evaluate(task.model, task, "test")[0]
    nonzero, total = count_nonzero(task.model, layers)
    metrics["nonzero_params"], metrics["total_params"] = float(nonzero), float(total)
    if context is not None:
        metrics.update(measure.measure(task.model, objectives, context))
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
    return replay(task, trial).model


def replay(task: Task, trial: FrozenTrial) -> PruneResult:
    """Like :func:`materialize`, with all that the replay measured (and its structured plan).

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
    return result


def load_study(storage: str, study_name: str | None) -> optuna.Study:
    """Load an existing autoprune study; with one study in the storage, the name may be omitted.

    Raises:
        StorageError: If the storage cannot be opened, holds no such study, or the study was
            not made by autoprune.
    """
    if storages.missing_file(storage):  # opening it would leave an empty database behind
        raise StorageError(f"storage {storages.describe(storage)} does not exist")
    storage = storages.open_storage(storage)
    with storages.storage_errors(storage):
        names = optuna.get_all_study_names(storage)
    if study_name is None:
        if len(names) != 1:
            listed = ", ".join(names) if names else "none"
            raise StorageError(
                f"give --study-name: storage {storages.describe(storage)} holds "
                f"{len(names)} studies ({listed})"
            )
        study_name = names[0]
    if study_name not in names:
        raise StorageError(f"no study named {study_name!r} in {storages.describe(storage)}")
    study = optuna.load_study(study_name=study_name, storage=storage)
    if STUDY_ATTR not in study.user_attrs:
        raise StorageError(f"study {study_name!r} was not made by autoprune")
    return study


def _load_existing(storage: Any, study_name: str | None) -> optuna.Study | None:
    if storage is None or study_name is None:
        return None
    with storages.storage_errors(storage):
        if study_name not in optuna.get_all_study_names(storage):
            return None
        return optuna.load_study(study_name=study_name, storage=storage)
