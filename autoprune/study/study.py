"""A study: created from its setup or opened again, its trials' objective, and replays.

:func:`open_study` is the one way into a running study, for ``autoprune search``,
:func:`autoprune.search` and every worker alike; :func:`objective_for` is its trials'
objective and the callbacks that keep the study's side products current.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial
from torch import nn

from autoprune import measure
from autoprune.errors import TaskError
from autoprune.inference import as_runtime, deploy
from autoprune.pruning.masks import count_nonzero
from autoprune.pruning.policy import Policy
from autoprune.study import storages
from autoprune.study.artifacts import FrontWeights
from autoprune.study.fidelity import Promoter, trial_fidelity
from autoprune.study.front_table import FrontTable
from autoprune.study.loading import await_setup
from autoprune.study.objective import Objective, screened_task
from autoprune.study.samplers import make_sampler
from autoprune.study.setup import (
    DEFAULT_SAMPLER,
    StudySetup,
    check_same,
    read_setup,
    write_setup,
)
from autoprune.study.warm_start import enqueue_warm_starts
from autoprune.task import Task
from autoprune.train import evaluate
from autoprune.trial import PruneResult, dense_on_device, prune_and_finetune

logger = logging.getLogger(__name__)

Callback = Callable[[optuna.Study, FrozenTrial], None]


def open_study(
    setup: StudySetup,
    task: Task,
    *,
    storage: str | optuna.storages.BaseStorage | None,
    study_name: str | None,
    sampler: optuna.samplers.BaseSampler | None = None,
    heartbeat: int | None = storages.HEARTBEAT,
    create_in_existing: bool = False,
) -> optuna.Study:
    """Create the study of ``setup`` (made by :func:`autoprune.study.setup.make_setup` for
    ``task``), or open it if it exists and was made with the same identity.

    A new study measures the dense model, stores the setup and enqueues its warm starts
    (at most half of ``setup.trials``). An existing one stores this run's settings (budget,
    sampler, constraints, ...), which workers that join it follow.

    Args:
        sampler: The sampler of this process; None: ``setup.sampler`` by name, seeded with
            the seed plus the trials already run, so that a resumed run does not replay the
            first run's random draws.
        heartbeat: Seconds between heartbeats of running trials, for an RDB URL (None: no
            heartbeats); see :mod:`autoprune.study.storages`.
        create_in_existing: Add Optuna's tables to a database that holds another
            application's tables (refused without it).

    Raises:
        StorageError: If the storage cannot be opened, holds another application's tables
            (without ``create_in_existing``), or the named study was not made by autoprune or
            was made with a different identity (task, dense weights, recipe, layers, space,
            objectives, seed).
    """
    storage = storages.open_storage(
        storage, for_writing=True, heartbeat=heartbeat, create_in_existing=create_in_existing
    )
    study = _load_existing(storage, study_name)
    created = False
    if study is None:
        setup = _with_dense(setup, dense_metrics(task, setup))
        study = _create(storage, study_name, setup)
        created = study is not None
        if study is None:  # another process created it since: join it as any other
            study = _load_existing(storage, study_name)
            assert study is not None
    if not created:
        await_setup(storage, study, _directions(setup))
        stored = read_setup(study)
        check_same(stored, setup, study_name)
        setup = _with_dense(setup, stored.dense)
    if sampler is None:
        n_before = 0 if created else len(study.get_trials(deepcopy=False))
        sampler = make_sampler(
            setup.sampler or DEFAULT_SAMPLER, seed=setup.seed + n_before, space=setup.space
        )
    study.sampler = sampler
    with storages.storage_errors(storage):
        write_setup(study, setup)
    if created and setup.warm_start is not None:
        # Warm starts take at most half of a known budget: the rest is the search's. Only
        # the process that created the study enqueues them, so that none is run twice.
        limit = None if setup.trials is None else max(1, setup.trials // 2)
        enqueue_warm_starts(
            study,
            task,
            setup.space,
            setup.layers,
            setup.warm_start,
            groups=setup.groups,
            blocks=setup.blocks,
            limit=limit,
        )
    return study


def _with_dense(setup: StudySetup, dense: Any) -> StudySetup:
    return dataclasses.replace(setup, dense=dict(dense))


def objective_for(study: optuna.Study, task: Task) -> tuple[Objective, list[Callback]]:
    """The objective of an opened study, as its setup says (space, layers, seed, objectives,
    constraints, early stop, fidelity), and the callbacks that keep its side products
    current: front weights, the ``autoprune_front`` table and promotions of screened trials.
    The callbacks go before the user's, who may read what they write."""
    setup = read_setup(study)
    weights = FrontWeights.for_study(study, setup.artifacts)
    table = FrontTable.for_study(study) if setup.front_table else None
    objective = Objective(
        task,
        setup.space,
        setup.layers,
        seed=setup.seed,
        objectives=setup.objectives,
        latency=setup.latency,
        groups=setup.groups,
        blocks=setup.blocks,
        on_result=weights.upload if weights is not None else None,
        constraints=setup.constraints,
        early_stop=setup.early_stop,
        fidelity=setup.fidelity,
    )
    if table is not None:
        table.write(study)  # a resumed study's table is current before its first new trial
    promoter = Promoter(setup.fidelity) if setup.fidelity is not None else None
    return objective, [c for c in (weights, table, promoter) if c is not None]


def dense_metrics(task: Task, setup: StudySetup) -> dict[str, float]:
    """Validation (and test) accuracy, nonzero and total prunable weights of the dense model,
    and the setup's size objectives (of its fp32 ONNX form in ONNX Runtime, in a study that
    searches quantization)."""
    dense = dense_on_device(task)
    metrics = {"accuracy": evaluate(dense, task, "val")[0]}
    if task.test is not None:
        metrics["test_accuracy"] = evaluate(dense, task, "test")[0]
    nonzero, total = count_nonzero(task.model, list(setup.layers))
    metrics["nonzero_params"], metrics["total_params"] = float(nonzero), float(total)
    context = measure.Context(
        task.example(1), setup.layers, setup.latency or measure.Latency(), task.forward
    )
    # A quantizing study measures its trials as deployed: the dense reference alike (fp32).
    deployed = as_runtime(setup.space.quantizations) == "onnxruntime"
    measured = deploy(task.model, task) if deployed else dense
    metrics.update(measure.measure(measured, setup.objectives, context))
    return metrics


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
    fidelity = trial_fidelity(trial)  # a screened trial replays its short fine-tune
    task = screened_task(task, fidelity) if fidelity < 1.0 else task
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


def _create(storage: Any, study_name: str | None, setup: StudySetup) -> optuna.Study | None:
    """Create the study and store ``setup`` with it at once; None if another process created
    a study of that name first (then that process stores its setup, and this one joins)."""
    with storages.storage_errors(storage):
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=study_name,
                directions=_directions(setup),
            )
        except optuna.exceptions.DuplicatedStudyError:
            return None
        write_setup(study, setup)  # first: whoever joins waits for it (_await_setup)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(setup.objectives))
    return study


def _directions(setup: StudySetup) -> list[Literal["maximize", "minimize"]]:
    """The directions of the study that ``setup`` creates."""
    return measure.directions(setup.objectives, setup.higher_is_better)


def _load_existing(storage: Any, study_name: str | None) -> optuna.Study | None:
    if storage is None or study_name is None:
        return None
    with storages.storage_errors(storage):
        if study_name not in optuna.get_all_study_names(storage):
            return None
        return optuna.load_study(study_name=study_name, storage=storage)
