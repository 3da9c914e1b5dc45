"""One trial: policy → pruned copy → fine-tune → numbers. Pure torch; no Optuna.

:func:`prune_and_finetune` is the whole trial; :func:`baseline` is the same trial for a
heuristic policy of the literature (``autoprune prune``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from autoprune import measure
from autoprune.inference import OnnxModel, deploy
from autoprune.pruning import structured
from autoprune.pruning.allocation import heuristic_policy
from autoprune.pruning.calibration import LayerStats, calibrate
from autoprune.pruning.criteria import get_criterion
from autoprune.pruning.masks import fold_masks, prunable_layers, score
from autoprune.pruning.policy import Policy
from autoprune.pruning.schedule import SCHEDULE_FUNCTIONS
from autoprune.recovery import Recovery
from autoprune.task import Task
from autoprune.train import EpochHook, StepHook, evaluate, fit, total_steps


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
    # The model as deployed (ONNX in ONNX Runtime, quantized as the policy says), whose
    # accuracy the metrics are, for a policy with the onnxruntime runtime.
    deployed: OnnxModel | None = None

    @property
    def measured(self) -> nn.Module:
        """The model the numbers are of: the deployed one, else the PyTorch one."""
        return self.deployed if self.deployed is not None else self.model


def prune_and_finetune(
    task: Task,
    policy: Policy,
    *,
    seed: int,
    stats: Mapping[str, LayerStats] | None = None,
    count: Sequence[str] | None = None,
    on_epoch: EpochHook | None = None,
) -> PruneResult:
    """Prune a copy of ``task.model`` by ``policy``, fine-tune it with the masks held, measure.

    The copy lives on the task's device (the dense model stays where it is); the result's
    model is left there. Deterministic for a given ``(task, policy, seed)`` on one kind of
    device: this is how a trial is replayed.

    Args:
        stats: Calibration statistics of the dense model's layers, if already measured (they
            are the same for every trial of a task); measured here when the criterion needs
            them (see :func:`autoprune.pruning.calibration.calibrate`).
        count: The layers whose weights ``nonzero_params`` and ``density`` count; by default
            the policy's layers (unstructured) or every Linear/Conv layer (structured).
        on_epoch: Called after each fine-tuning epoch (see :func:`autoprune.train.fit`).

    With the ``onnxruntime`` runtime, the fine-tuned model is then exported to ONNX and
    quantized as the policy says (on a CPU copy, see :func:`autoprune.inference.deploy`), and
    accuracy is measured on that deployed model in ONNX Runtime.

    Raises:
        TrialFailed: If fine-tuning hits a non-finite loss (``DeployFailed``, a subclass, if
            the model cannot be exported or quantized as asked).
        TaskError: If the task's device is not available here.
    """
    timings: dict[str, float] = {}
    model = copy.deepcopy(task.model).to(task.torch_device)
    plan, on_step = None, None
    if policy.granularity == "structured":
        with _timed(timings, "pruning"):
            plan = structured.prune_task_model(model, task, policy, seed=seed, stats=stats)
        layers = list(count) if count is not None else prunable_layers(task.model)
    else:
        on_step = _apply_unstructured(model, task, policy, seed, stats, timings)
        layers = list(count) if count is not None else list(policy.sparsity)
    with _timed(timings, "finetuning"):
        torch.manual_seed(seed)
        recovery = _recovery(task, policy)
        history = fit(
            model,
            task,
            seed=seed,
            on_epoch=on_epoch,
            on_step=on_step,
            recovery=recovery,
            timings=timings,
        )
        fold_masks(model)
    deployed = None
    if policy.runtime == "onnxruntime":
        with _timed(timings, "deploying"):
            deployed = deploy(model, task, policy.quantization)
    with _timed(timings, "evaluation"):
        scored = deployed if deployed is not None else model
        accuracy, val_loss = evaluate(scored, task, "val")
        test_accuracy = evaluate(scored, task, "test")[0] if task.test is not None else None
        context = measure.Context(task.example(1), tuple(layers), forward=task.forward)
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
    return PruneResult(model, policy, metrics, sparsity, history, timings, plan, deployed)


def _recovery(task: Task, policy: Policy) -> Recovery:
    """The policy's recovery settings; its teacher, when it distills, the dense model."""
    teacher = dense_on_device(task) if policy.distill else None
    return Recovery(
        lr_scale=policy.lr_scale, rewind=policy.rewind, distill=policy.distill, teacher=teacher
    )


def _apply_unstructured(
    model: nn.Module,
    task: Task,
    policy: Policy,
    seed: int,
    stats: Mapping[str, LayerStats] | None,
    timings: dict[str, float],
) -> StepHook | None:
    """Mask ``model`` by ``policy``'s schedule; return the schedule's per-step hook (None for
    one-shot pruning, whose masks are all in place before fine-tuning)."""
    with _timed(timings, "scoring"):
        needs = get_criterion(policy.criterion).needs
        if needs and stats is None:
            stats = calibrate(model, task, list(policy.sparsity), needs)
        torch.manual_seed(seed)  # the random criterion draws from here
        scores = score(model, policy, stats)
    with _timed(timings, "masking"):
        return SCHEDULE_FUNCTIONS[policy.schedule](model, policy, scores, stats, total_steps(task))


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


def dense_on_device(task: Task) -> nn.Module:
    """``task.model`` on the task's device: the model itself when it is there already, else a
    copy (for reading only: gradients, dense metrics)."""
    device = task.torch_device
    if all(
        t.device == device for t in itertools.chain(task.model.parameters(), task.model.buffers())
    ):
        return task.model
    return copy.deepcopy(task.model).to(device)


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The seed of one trial's random criterion and batch order."""
    return study_seed * 1_000_003 + trial_number


def baseline(
    task: Task,
    allocation: str,
    target: float,
    *,
    seed: int = 0,
    layers: Sequence[str] | None = None,
    schedule: str = "oneshot",
    distill: float = 0.0,
    lr_scale: float = 1.0,
    rewind: bool = False,
) -> PruneResult:
    """Prune ``task.model`` by the heuristic ``allocation`` at ``target`` sparsity (magnitude
    within each layer), fine-tune with the task's recipe, and measure: the one-shot baseline.

    Args:
        layers: The layers to prune; default: every prunable layer.
        schedule: The pruning schedule (see :mod:`autoprune.pruning.schedule`).
        distill, lr_scale, rewind: Recovery settings instead of the task's recipe (see
            :class:`~autoprune.pruning.policy.Policy`), e.g. for a ``lamp+gradual+distill`` row.

    Raises:
        SpecError: On an unknown allocation, a target outside [0, 1) or a bad recovery
            setting.
    """
    layers = list(layers) if layers is not None else prunable_layers(task.model)
    policy = dataclasses.replace(
        heuristic_policy(allocation, task.model, layers, target),
        schedule=schedule,
        distill=distill,
        lr_scale=lr_scale,
        rewind=rewind,
    )
    return prune_and_finetune(task, policy, seed=seed)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
