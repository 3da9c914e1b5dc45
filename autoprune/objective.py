"""One trial: policy → pruned copy → fine-tune → numbers."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import optuna
import torch
from torch import Tensor, nn

from autoprune import measure, structured
from autoprune.constraints import Constraints
from autoprune.criteria import calibration_gradients, get_criterion
from autoprune.errors import TrialFailed
from autoprune.masks import fold_masks, prunable_layers, score
from autoprune.policy import Policy
from autoprune.schedule import SCHEDULE_FUNCTIONS, steps_per_epoch
from autoprune.space import SearchSpace, suggest_policy
from autoprune.stopping import EarlyStop
from autoprune.task import Task
from autoprune.train import EpochHook, StepHook, evaluate, fit

# The default objectives, in order; a study stores its own (``study.metric_names``).
METRIC_NAMES = measure.DEFAULT_OBJECTIVES
DIRECTIONS: list[Literal["maximize", "minimize"]] = measure.directions(METRIC_NAMES)
# Called with (trial, result, values) once a trial's numbers are in, e.g. to store its weights.
ResultHook = Callable[[optuna.Trial, "PruneResult", Sequence[float]], object]


@dataclasses.dataclass
class PruneResult:
    """A pruned, fine-tuned model (masks folded in) and what was measured on it."""

    model: nn.Module
    policy: Policy
    metrics: dict[str, float]
    layer_sparsity: dict[str, float]
    history: dict[str, list[list[float]]]
    timings: dict[str, float]
    plan: structured.Plan | None = None  # what a structured policy removed


def prune_and_finetune(
    task: Task,
    policy: Policy,
    *,
    seed: int,
    grads: Mapping[str, Tensor] | None = None,
    count: Sequence[str] | None = None,
    on_epoch: EpochHook | None = None,
) -> PruneResult:
    """Prune a copy of ``task.model`` by ``policy``, fine-tune it with the masks held, measure.

    Deterministic for a given ``(task, policy, seed)``: this is how a trial is replayed.

    Args:
        grads: Calibration gradients of the dense model, if already computed (they are
            the same for every trial of a task); computed here when the criterion needs them.
        count: The layers whose weights ``nonzero_params`` and ``density`` count; by default
            the policy's layers (unstructured) or every Linear/Conv layer (structured).
        on_epoch: Called after each fine-tuning epoch (see :func:`autoprune.train.fit`).

    Raises:
        TrialFailed: If fine-tuning hits a non-finite loss.
    """
    timings: dict[str, float] = {}
    model = copy.deepcopy(task.model)
    plan, on_step = None, None
    if policy.granularity == "structured":
        with _timed(timings, "pruning"):
            plan = structured.prune_task_model(model, task, policy, seed=seed, grads=grads)
        layers = list(count) if count is not None else prunable_layers(task.model)
    else:
        on_step = _apply_unstructured(model, task, policy, seed, grads, timings)
        layers = list(count) if count is not None else list(policy.sparsity)
    with _timed(timings, "finetuning"):
        torch.manual_seed(seed)
        history = fit(
            model,
            task,
            epochs=task.finetune_epochs,
            seed=seed,
            on_epoch=on_epoch,
            on_step=on_step,
        )
        fold_masks(model)
    with _timed(timings, "evaluation"):
        accuracy, val_loss = evaluate(model, task, "val")
        test_accuracy = evaluate(model, task, "test")[0] if task.test is not None else None
        context = measure.Context(structured.example_input(task.val)[:1], tuple(layers))
        nonzero = measure.nonzero_params(model, context)
        dense = dict(task.model.named_modules())
        total = sum(dense[name].weight.numel() for name in layers)
        sparsity = _layer_sparsity(model, task.model, layers)
    metrics = {
        "accuracy": accuracy,
        "val_loss": val_loss,
        "nonzero_params": float(nonzero),
        "total_params": float(total),
        "density": nonzero / total,
        "sparsity": 1.0 - nonzero / total,
    }
    if test_accuracy is not None:
        metrics["test_accuracy"] = test_accuracy
    return PruneResult(model, policy, metrics, sparsity, history, timings, plan)


def _apply_unstructured(
    model: nn.Module,
    task: Task,
    policy: Policy,
    seed: int,
    grads: Mapping[str, Tensor] | None,
    timings: dict[str, float],
) -> StepHook | None:
    """Mask ``model`` by ``policy``'s schedule; return the schedule's per-step hook (None for
    one-shot pruning, whose masks are all in place before fine-tuning)."""
    with _timed(timings, "scoring"):
        if get_criterion(policy.criterion).needs_grad and grads is None:
            grads = calibration_gradients(model, task, list(policy.sparsity))
        torch.manual_seed(seed)  # the random criterion draws from here
        scores = score(model, policy, grads)
    with _timed(timings, "masking"):
        steps = task.finetune_epochs * steps_per_epoch(task)
        return SCHEDULE_FUNCTIONS[policy.schedule](model, policy, scores, grads, steps)


def _layer_sparsity(model: nn.Module, dense: nn.Module, layers: Sequence[str]) -> dict[str, float]:
    """Fraction of each layer's dense weights that are gone: zeroed, or removed (structured)."""
    modules, dense_modules = dict(model.named_modules()), dict(dense.named_modules())
    sparsity = {}
    for name in layers:
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        kept = int(torch.count_nonzero(weight)) if isinstance(weight, Tensor) else 0
        sparsity[name] = 1.0 - kept / dense_modules[name].weight.numel()
    return sparsity


class Objective:
    """The Optuna objective: ``objective(trial) -> (val accuracy, size, [size])``.

    The size objectives are named in ``objectives`` (see :mod:`autoprune.measure`).
    Everything a trial produces besides its values is kept in its user attrs: the policy,
    its seed, test accuracy, density, per-layer sparsity, loss curves and a time split.
    ``on_result(trial, result, values)``, if given, is called before the values are returned
    (it is how the weights of front trials are stored).
    ``constraints`` are recorded with ``trial.set_constraint``; ``early_stop`` may end a
    hopeless trial after its first epoch with ``optuna.TrialPruned``.
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
    ):
        self.task, self.space, self.layers, self.seed = task, space, list(layers), seed
        self.constraints, self.early_stop = constraints, early_stop
        self.objectives = measure.check_objectives(objectives)
        self.groups, self.blocks = list(groups), list(blocks)
        example = structured.example_input(task.val)[:1]
        self.context = measure.Context(example, tuple(layers), latency or measure.Latency())
        self.on_result = on_result
        self._grads: dict[str, Tensor] | None = None

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        policy = suggest_policy(
            trial, self.space, self.layers, self.groups, self.blocks, model=self.task.model
        )
        seed = trial_seed(self.seed, trial.number)
        trial.set_user_attr("policy", policy.to_dict())
        trial.set_user_attr("seed", seed)
        hook = self.early_stop.hook(trial, self.layers) if self.early_stop else None
        try:
            result = prune_and_finetune(
                self.task,
                policy,
                seed=seed,
                grads=self._grads_for(policy),
                count=self.layers,
                on_epoch=hook,
            )
        except TrialFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            raise
        for key, value in _user_attrs(result).items():
            trial.set_user_attr(key, value)
        measured = {
            **result.metrics,
            **measure.measure(result.model, self.objectives, self.context),
        }
        values = tuple(measured[name] for name in self.objectives)
        if self.constraints is not None:
            for key, value in self.constraints.violations(result.metrics).items():
                trial.set_constraint(key, value)
        if self.on_result is not None:
            self.on_result(trial, result, values)
        return values

    def _grads_for(self, policy: Policy) -> dict[str, Tensor] | None:
        # The dense model's gradients are the same for every trial: compute them once, for
        # every layer (a channel group may reach beyond the searched layers).
        if not get_criterion(policy.criterion).needs_grad:
            return None
        if self._grads is None:
            layers = sorted(set(prunable_layers(self.task.model)) | set(self.layers))
            self._grads = calibration_gradients(self.task.model, self.task, layers)
        return self._grads


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The seed of one trial's random criterion and batch order."""
    return study_seed * 1_000_003 + trial_number


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


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
