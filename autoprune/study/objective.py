"""The Optuna objective: a trial's policy drawn from the space, run by :mod:`autoprune.trial`,
and its numbers recorded on the Optuna trial."""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import optuna

from autoprune import devices, measure
from autoprune.errors import TrialFailed
from autoprune.pruning.calibration import LayerStats, calibrate
from autoprune.pruning.criteria import get_criterion, statistics_for
from autoprune.pruning.masks import prunable_layers
from autoprune.pruning.policy import Policy
from autoprune.study.constraints import Constraints
from autoprune.study.fidelity import EPOCHS_ATTR, FIDELITY_ATTR, Fidelity, starting_fidelity
from autoprune.study.space import SearchSpace, suggest_policy
from autoprune.study.stopping import EarlyStop
from autoprune.task import Task
from autoprune.train import steps_per_epoch, total_steps
from autoprune.trial import PruneResult, dense_on_device, prune_and_finetune, trial_seed

# The default objectives, in order; a study stores its own (``study.metric_names``).
METRIC_NAMES = measure.DEFAULT_OBJECTIVES
DIRECTIONS: list[Literal["maximize", "minimize"]] = measure.directions(METRIC_NAMES)
# Called with (trial, result, values) once a trial's numbers are in, e.g. to store its weights.
ResultHook = Callable[[optuna.Trial, PruneResult, Sequence[float]], object]


class Objective:
    """The Optuna objective: ``objective(trial) -> (val accuracy, size, [size])``.

    The size objectives are named in ``objectives`` (see :mod:`autoprune.measure`).
    Everything a trial produces besides its values is kept in its user attrs: the policy,
    its seed, test accuracy, density, per-layer sparsity, loss curves and a time split.
    ``on_result(trial, result, values)``, if given, is called before the values are returned
    (it is how the weights of front trials are stored).
    ``constraints`` are recorded with ``trial.set_constraint``; ``early_stop`` may end a
    hopeless trial after its first epoch with ``optuna.TrialPruned``. With ``fidelity``, a
    sampled trial is screened (a short fine-tune, :mod:`autoprune.study.fidelity`) and
    records its ``fidelity`` and ``epochs_spent``; a screened trial's weights are not kept.

    A trial that fails (``TrialFailed``: a non-finite loss or objective, or the device ran out
    of memory, whose cached memory is then released) records why in ``fail_reason``, and the
    study goes on with the next one.
    """

    def __init__(
        self,
        task: Task,
        space: SearchSpace,
        layers: Sequence[str],
        *,
        seed: int = 0,
        objectives: Sequence[str] = METRIC_NAMES,
        latency: measure.Latency | None = None,
        groups: Sequence[str] = (),
        blocks: Sequence[str] = (),
        on_result: ResultHook | None = None,
        constraints: Constraints | None = None,
        early_stop: EarlyStop | None = None,
        fidelity: Fidelity | None = None,
    ):
        self.task, self.space, self.layers, self.seed = task, space, list(layers), seed
        self.fidelity = fidelity
        self.constraints, self.early_stop = constraints, early_stop
        self.objectives = measure.check_objectives(objectives)
        self.groups, self.blocks = list(groups), list(blocks)
        self.context = measure.Context(
            task.example(1), tuple(layers), latency or measure.Latency(), task.forward
        )
        self.on_result = on_result
        self.device = task.torch_device
        self._stats: dict[str, LayerStats] | None = None

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        task, level = self.task, 1.0
        if self.fidelity is not None:  # first: the budget counts the trial by its fidelity
            level = starting_fidelity(trial, self.fidelity)
            trial.set_user_attr(FIDELITY_ATTR, level)
            task = screened_task(task, level) if level < 1.0 else task
            trial.set_user_attr(EPOCHS_ATTR, epochs_spent(task))
        policy = suggest_policy(
            trial, self.space, self.layers, self.groups, self.blocks, model=self.task.model
        )
        seed = trial_seed(self.seed, trial.number)
        trial.set_user_attr("policy", policy.to_dict())
        trial.set_user_attr("seed", seed)
        hook = self.early_stop.hook(trial, self.layers) if self.early_stop else None
        out_of_memory = None
        try:
            result = prune_and_finetune(
                task,
                policy,
                seed=seed,
                stats=self._stats_for(policy),
                count=self.layers,
                on_epoch=hook,
            )
            for key, value in _user_attrs(result).items():
                trial.set_user_attr(key, value)
            measured = {
                **result.metrics,
                **measure.measure(result.measured, self.objectives, self.context),
            }
        except TrialFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            raise
        except Exception as e:
            if not devices.is_out_of_memory(e):
                raise
            out_of_memory = _first_line(e)
        if out_of_memory is not None:
            # Released here, not in the except clause: the error's frames hold the trial's
            # model copy, activations and gradients until the error itself is gone.
            gc.collect()
            devices.release_memory(self.device)
            reason = f"out of memory on {self.device}: {out_of_memory}"
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        values = tuple(measured[name] for name in self.objectives)
        bad = [
            name
            for name, value in zip(self.objectives, values, strict=True)
            if not math.isfinite(value)
        ]
        if bad:  # Optuna would fail the trial; fail it here, before its weights are stored
            reason = f"objective {bad[0]} is {measured[bad[0]]}, not a finite number"
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        if self.constraints is not None:
            for key, value in self.constraints.violations(
                result.metrics, self.task.higher_is_better
            ).items():
                trial.set_constraint(key, value)
        if self.on_result is not None and level >= 1.0:  # a screened trial is never on the front
            self.on_result(trial, result, values)
        return values

    def _stats_for(self, policy: Policy) -> dict[str, LayerStats] | None:
        # The dense model's statistics are the same for every trial: measure them once, for
        # every layer (a channel group may reach beyond the searched layers) and for every
        # criterion the space offers, in one pass over the calibration batches.
        if not get_criterion(policy.criterion).needs:
            return None
        if self._stats is None:
            layers = sorted(set(prunable_layers(self.task.model)) | set(self.layers))
            space, offered = self.space, {policy.criterion}
            if "unstructured" in space.granularities:
                offered |= set(space.criteria)
            if "structured" in space.granularities:
                offered |= set(space.channel_criteria)
            needs = statistics_for(sorted(offered))
            self._stats = calibrate(dense_on_device(self.task), self.task, layers, needs)
        return self._stats


def screened_task(task: Task, screen: float) -> Task:
    """``task`` with a fine-tune of ``screen`` of its optimizer steps (at least one step).

    The budget becomes ``finetune_steps``, so a fraction of an epoch is possible; the
    learning-rate schedule (and a gradual pruning schedule) then spans the short fine-tune,
    as a short run of the recipe would.
    """
    full = total_steps(task)
    if full == 0:
        return task  # no fine-tune to shorten: evaluated as pruned
    return dataclasses.replace(task, finetune_steps=max(1, math.floor(screen * full)))


def epochs_spent(task: Task) -> float:
    """Fine-tune epochs (optimizer steps / steps per epoch) that ``task`` runs."""
    steps = total_steps(task)
    return steps / steps_per_epoch(task) if steps else 0.0


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _user_attrs(result: PruneResult) -> dict[str, Any]:
    # Each attr is one storage commit, so what can be derived is not stored: sparsity is
    # 1 - density, the total is the study's, the final val loss ends the val curve.
    attrs: dict[str, Any] = {"density": result.metrics["density"]}
    if "test_accuracy" in result.metrics:
        attrs["test_accuracy"] = result.metrics["test_accuracy"]
    attrs["layer_sparsity"] = result.layer_sparsity
    attrs["history"] = result.history
    attrs["timings"] = result.timings
    return attrs
