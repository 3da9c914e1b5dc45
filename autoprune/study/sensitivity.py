"""Sensitivity analysis: each layer's accuracy-versus-sparsity curve, and a prior from it.

One layer at a time is pruned by magnitude and the model evaluated as it is (no fine-tuning).
The curves are stored with the study (user attr ``"autoprune_sensitivity"``:
``{layer: [[sparsity, val accuracy], ...]}``), drawn by the report, and turned into per-layer
offsets for the ``allocation`` parametrization: the search's first trials then start from LAMP
moved towards the layers that tolerate pruning.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping, Sequence

import optuna

from autoprune.pruning.masks import apply_masks, compute_masks, score
from autoprune.pruning.policy import Policy
from autoprune.study.record import SENSITIVITY_ATTR
from autoprune.study.setup import read_setup
from autoprune.study.space import SearchSpace, heuristic_params
from autoprune.task import Task
from autoprune.train import evaluate

SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
Curves = dict[str, list[list[float]]]


def layer_sensitivity(
    task: Task, layers: Sequence[str], sparsities: Sequence[float] = SPARSITIES
) -> Curves:
    """``{layer: [[sparsity, val accuracy], ...]}`` with only that layer pruned (magnitude)."""
    curves: Curves = {}
    for layer in layers:
        curve = []
        for sparsity in sparsities:
            model = copy.deepcopy(task.model).to(task.torch_device)
            policy = Policy({layer: sparsity})
            apply_masks(model, compute_masks(policy, score(model, policy)))
            curve.append([float(sparsity), evaluate(model, task, "val")[0]])
        curves[layer] = curve
    return curves


def sensitivity_offsets(curves: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, float]:
    """Per-layer offsets in [-1, 1]: negative (prune more) for the layers whose accuracy holds
    best as they are pruned (by the mean accuracy over the curve), positive for the others."""
    robustness = {k: statistics.fmean(a for _, a in curve) for k, curve in curves.items()}
    middle = statistics.fmean(robustness.values())
    spread = max((abs(r - middle) for r in robustness.values()), default=0.0)
    if spread == 0.0:
        return dict.fromkeys(curves, 0.0)
    return {k: -(r - middle) / spread for k, r in robustness.items()}


def enqueue_prior(
    study: optuna.Study,
    task: Task,
    space: SearchSpace,
    layers: Sequence[str],
    curves: Mapping[str, Sequence[Sequence[float]]],
    sparsities: Sequence[float],
) -> int:
    """Enqueue LAMP moved by the sensitivity offsets at each target (allocation
    parametrization only; user attr ``warm_start`` ``"sensitivity@0.9"``); return how many."""
    if space.parametrization != "allocation" or "lamp" not in space.allocations:
        return 0
    offsets = {f"offset:{k}": v for k, v in sensitivity_offsets(curves).items()}
    n = 0
    for schedule in space.schedules:
        for target in sparsities:
            params = heuristic_params(space, "lamp", target, task.model, layers, schedule)
            if params is None:
                continue
            label = f"sensitivity@{target:g}" + ("" if schedule == "oneshot" else f" {schedule}")
            study.enqueue_trial(params | offsets, user_attrs={"warm_start": label})
            n += 1
    return n


def analyze(
    study: optuna.Study, task: Task, prior_sparsities: Sequence[float]
) -> tuple[Curves, int]:
    """Compute the curves of the study's layers, store them in the study, and enqueue the prior
    at ``prior_sparsities`` (see :func:`enqueue_prior`); return the curves and that count."""
    setup = read_setup(study)
    curves = layer_sensitivity(task, list(setup.layers))
    study.set_user_attr(SENSITIVITY_ATTR, curves)
    prior = enqueue_prior(study, task, setup.space, list(setup.layers), curves, prior_sparsities)
    return curves, prior
