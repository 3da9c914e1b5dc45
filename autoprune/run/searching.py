"""``autoprune.search``: the Python way into a study, on the same path as the CLI's.

A setup is made from the arguments (:func:`autoprune.study.setup.make_setup`, whose defaults
are a study spec's), the study is opened with it (:func:`autoprune.study.study.open_study`)
and its trials run in the one trial loop (:func:`autoprune.run.worker.run_worker`), exactly
as ``autoprune search SPEC`` does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import optuna

from autoprune import devices
from autoprune.errors import SpecError
from autoprune.measure import DEFAULT_OBJECTIVES, Latency
from autoprune.run.worker import run_worker
from autoprune.study.artifacts import ArtifactSpec
from autoprune.study.constraints import Constraints
from autoprune.study.fidelity import Fidelity
from autoprune.study.setup import DEFAULT_SAMPLER, DEFAULT_TRIALS, check_seed, make_setup
from autoprune.study.space import SearchSpace
from autoprune.study.stopping import EarlyStop
from autoprune.study.study import Callback, open_study
from autoprune.study.trials import whole
from autoprune.study.warm_start import DEFAULT_WARM_START, WarmStart
from autoprune.task import Task
from autoprune.tasks import load_task

logger = logging.getLogger(__name__)


def search(
    task: Task | str,
    *,
    n_trials: int | None = DEFAULT_TRIALS,
    timeout: float | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    seed: int = 0,
    space: SearchSpace | None = None,
    sampler: optuna.samplers.BaseSampler | str = DEFAULT_SAMPLER,
    warm_start: WarmStart | None = DEFAULT_WARM_START,
    constraints: Constraints | None = None,
    early_stop: EarlyStop | None = None,
    callbacks: Iterable[Callback] = (),
    artifacts: ArtifactSpec | None = None,
    front_table: bool = True,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    latency: Latency | None = None,
    device: str | None = None,
    create_in_existing: bool = False,
    fidelity: Fidelity | None = None,
) -> optuna.Study:
    """Search pruning policies of ``task``'s model; return the (new or resumed) Optuna study.

    Objectives: maximise validation accuracy, minimise the size objectives named in
    ``objectives`` (nonzero prunable weights by default). The Pareto front is
    ``study.best_trials``; :func:`autoprune.pareto_front` tabulates it. Every default is
    the default of a study spec (``autoprune search SPEC``), so both search the same way.

    Args:
        task: The task, or a reference that builds it (a built-in name such as
            ``"digits-cnn"``, or ``"package.module:function"``); with a reference, workers
            in other processes can join the study (``autoprune worker``).
        n_trials: The study's target: trials it holds in the end, counting those of earlier
            runs (a resumed study that holds them runs none); None: until ``timeout``.
        timeout: Seconds after which no new trial starts.
        storage: Optuna storage or database URL; None keeps the study in memory.
        study_name: Name of the study; an existing study of that name is resumed.
        seed: Seeds the sampler and every trial's fine-tuning.
        space: The search space; None: ``SearchSpace()``.
        sampler: A sampler, or the name of one in :data:`autoprune.study.samplers.SAMPLERS`
            (seeded with ``seed``).
        warm_start: Heuristic policies a new study tries first (at most half of
            ``n_trials``); None: none.
        constraints: Bounds on accuracy and size; infeasible trials leave the front.
        early_stop: Stops hopeless trials after their first epoch (state PRUNED); None: never.
        callbacks: Called as ``callback(study, trial)`` after each trial.
        artifacts: Where the weights of front trials are kept (default: next to a SQLite
            file).
        front_table: Keep the ``autoprune_front`` table of a database storage up to date.
        objectives: ``"accuracy"``, then one or two of :data:`autoprune.measure.OBJECTIVES`.
        latency: How ``latency_ms`` is measured (batch size, threads, repeats).
        device: Where the trials run, overriding the task's own ``device``: ``auto``,
            ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; not part of the study (a resumed run or
            a worker may run elsewhere). None: the task's.
        create_in_existing: Add Optuna's tables to a database that holds another
            application's tables (without it, such a database is refused, untouched).
        fidelity: Screen sampled policies with a short fine-tune and promote the best to
            the full one (:class:`autoprune.study.fidelity.Fidelity`); ``n_trials`` then
            counts fine-tune compute in full trials. None: every trial is full.

    SIGINT and SIGTERM stop the search as they stop a worker: the running trial fails, is
    queued for retry, and the study is returned.

    Raises:
        SpecError: On bad objectives, budget or sampler, or unstructured pruning with an
            objective blind to it.
        TaskError: If the task reference does not build a task, the model has no prunable
            layer left by the space's globs, the data does not fit the model, or the device
            is unknown or not available here.
        StorageError: If the storage cannot be opened, holds another application's tables
            (see ``create_in_existing``), or the named study was created with a different
            task, recipe, search space, objectives or seed.
        SpecError: Also if neither ``n_trials`` nor ``timeout`` is given (a ValueError).
    """
    if n_trials is None and timeout is None:
        raise SpecError("give n_trials or timeout, or the search never ends")
    if not isinstance(sampler, (str, optuna.samplers.BaseSampler)):
        raise SpecError(f"sampler must be a name or an Optuna sampler, got {sampler!r}")
    check_seed(seed)  # before the task is built with it
    if device is not None:
        devices.resolve_device(device)  # likewise: unknown or absent here, refused at once
    task_ref = task if isinstance(task, str) else None
    loaded = load_task(task, seed=seed) if isinstance(task, str) else task
    if device is not None:
        loaded = dataclasses.replace(loaded, device=device)
    setup = make_setup(
        loaded,
        task_ref=task_ref,
        trials=n_trials,
        seed=seed,
        sampler=sampler if isinstance(sampler, str) else None,
        space=space,
        warm_start=warm_start,
        constraints=constraints,
        early_stop=early_stop,
        artifacts=artifacts,
        objectives=objectives,
        latency=latency,
        front_table=front_table,
        fidelity=fidelity,
    )
    study = open_study(
        setup,
        loaded,
        storage=storage,
        study_name=study_name,
        sampler=None if isinstance(sampler, str) else sampler,
        create_in_existing=create_in_existing,
    )
    summary = run_worker(study, loaded, target=n_trials, timeout=timeout, callbacks=callbacks)
    logger.info("%s", summary)
    return whole(study)
