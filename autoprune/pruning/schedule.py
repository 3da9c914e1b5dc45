"""Pruning schedules: when, during fine-tuning, the policy's sparsity is reached.

- ``oneshot``: the masks of the policy are applied before fine-tuning and held.
- ``gradual``: automated gradual pruning (Zhu & Gupta 2017). Fine-tuning starts dense; every
  few optimizer steps the masks are recomputed from the current weights at the fraction
  ``1 - (1 - t / T)^3`` of the policy's sparsity, ``T`` being ``AGP_END`` of the fine-tuning
  steps; the rest of the budget recovers at the final sparsity. Pruned weights stay pruned.
- ``gradual-regrow``: the same, but every recomputation ranks all weights, pruned ones by the
  value they had when pruned, so a weight whose score recovers relative to the others regrows.

Each schedule is a function ``(model, policy, scores, stats, steps) -> on_step hook | None``
(``stats``: the layers' calibration statistics, for criteria that rescore with them) that
applies the first masks; the hook runs before each optimizer step (see
:func:`autoprune.train.fit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from autoprune._registry import Registry
from autoprune.pruning.calibration import LayerStats
from autoprune.pruning.criteria import get_criterion
from autoprune.pruning.masks import apply_masks, compute_masks, layer_stats
from autoprune.pruning.policy import SCHEDULES, Policy
from autoprune.train import StepHook

# Fraction of the fine-tuning steps after which the gradual schedule holds the final sparsity.
AGP_END = 0.75
# Mask recomputations over the ramp (at most one per step).
AGP_UPDATES = 32

Schedule = Callable[
    [nn.Module, Policy, Mapping[str, Tensor], "Mapping[str, LayerStats] | None", int],
    "StepHook | None",
]


def agp_fraction(step: int, end: int) -> float:
    """Fraction of the final sparsity reached at ``step`` on the cubic ramp ending at ``end``."""
    if end <= 0:
        return 1.0
    return 1.0 - (1.0 - min(step, end) / end) ** 3


def oneshot(
    model: nn.Module,
    policy: Policy,
    scores: Mapping[str, Tensor],
    stats: Mapping[str, LayerStats] | None,
    steps: int,
) -> StepHook | None:
    """Apply the policy's masks now; nothing changes during fine-tuning."""
    apply_masks(model, compute_masks(policy, scores))
    return None


def _gradual(regrow: bool) -> Schedule:
    def schedule(
        model: nn.Module,
        policy: Policy,
        scores: Mapping[str, Tensor],
        stats: Mapping[str, LayerStats] | None,
        steps: int,
    ) -> StepHook | None:
        end = int(AGP_END * steps)
        if end <= 0:  # no step to ramp over: as one shot
            return oneshot(model, policy, scores, stats, steps)
        modules = dict(model.named_modules())
        layers = list(policy.sparsity)
        apply_masks(model, {k: torch.ones_like(scores[k], dtype=torch.bool) for k in layers})
        every = max(1, math.ceil(end / AGP_UPDATES))
        criterion = get_criterion(policy.criterion, "unstructured")
        score_fn = criterion.score
        assert score_fn is not None  # unstructured criteria score weights
        given = layer_stats(criterion, stats, layers)

        def on_step(step: int, model: nn.Module) -> None:
            if step % every or step > end:
                return
            # Look one interval ahead, so that the last update before ``end`` is the target.
            fraction = agp_fraction(step + every, end)
            target = Policy(
                sparsity={k: s * fraction for k, s in policy.sparsity.items()},
                criterion=policy.criterion,
                scope=policy.scope,
                rule=policy.rule,
                alpha=policy.alpha,
            )
            with torch.no_grad():
                masks = {k: modules[k].weight_mask.bool() for k in layers}
                current = {}
                for k in layers:
                    weight = modules[k].weight_orig * (1 if regrow else masks[k])
                    s = score_fn(weight.detach(), given[k]).float()
                    # Without regrowth the ratio rule counts the pruned weights first; the
                    # mean rule's threshold needs finite scores, and the mask below keeps
                    # pruned weights pruned.
                    keep_pruned = not regrow and policy.rule == "ratio"
                    current[k] = s.masked_fill(~masks[k], -math.inf) if keep_pruned else s
                for k, mask in compute_masks(target, current).items():
                    modules[k].weight_mask.copy_(mask if regrow else mask & masks[k])

        return on_step

    return schedule


# The names are :data:`autoprune.pruning.policy.SCHEDULES`, where a Policy checks its schedule
# (this module imports Policy, so not the other way round); here are their functions.
SCHEDULE_FUNCTIONS: Registry[Schedule] = Registry(
    "schedule",
    {
        "oneshot": oneshot,
        "gradual": _gradual(regrow=False),
        "gradual-regrow": _gradual(regrow=True),
    },
)
assert SCHEDULE_FUNCTIONS.names() == SCHEDULES
