"""Policy: frozen, JSON-able data saying how to prune a model."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from autoprune._registry import from_dict
from autoprune.errors import SpecError
from autoprune.pruning.criteria import GRANULARITIES, get_criterion

SCOPES = ("layer", "global")
RULES = ("ratio", "mean")
# When the sparsity is reached during fine-tuning (see autoprune.pruning.schedule).
SCHEDULES = ("oneshot", "gradual", "gradual-regrow")
# Applied after pruning and fine-tuning (see autoprune.inference.quantize).
QUANTIZATIONS = ("none", "int8-dynamic", "int8-static")
# Where the trial's model is measured: PyTorch eager, or exported to ONNX in ONNX Runtime.
RUNTIMES = ("pytorch", "onnxruntime")
# The largest factor on the task's learning rate: with Task's own bound (autoprune.task.MAX_LR)
# the rate stays far inside float32, so a diverging trial fails on its loss, not in the optimizer.
MAX_LR_SCALE = 1e3
# Recovery settings (see autoprune.recovery) at the task's own recipe: a policy dict leaves
# them out at these values, so that dicts from before them read and compare as they were.
RECOVERY_DEFAULTS: dict[str, object] = {"distill": 0.0, "lr_scale": 1.0, "rewind": False}


@dataclasses.dataclass(frozen=True)
class Policy:
    """How to prune: which layers, how much, by which criterion.

    Args:
        sparsity: Layer name (module path, e.g. ``"features.0"``) → fraction of its weights to
            prune. With the ``ratio`` rule this is the target; with the ``mean`` rule it is the
            most that layer may be pruned. Only the named layers are pruned.
        criterion: Name of a registered criterion (see
            :data:`autoprune.pruning.criteria.CRITERIA`).
        scope: ``"layer"``: each layer is ranked on its own. ``"global"``: one threshold over
            all layers' scores; with the ``ratio`` rule the total pruned count is
            ``sum(sparsity[l] * size(l))`` and the split between layers follows the scores.
        rule: ``"ratio"``: prune exactly the lowest-scoring fraction. ``"mean"``: the article's
            rule, prune the weights whose score is below ``alpha * mean(S)``.
        alpha: Multiplier of the mean threshold (``mean`` rule only).
        granularity: ``"unstructured"``: zero single weights (masks). ``"structured"``:
            remove whole output channels/neurons, so the model gets smaller and faster. Then
            ``sparsity`` is keyed by channel group (the first layer of a set of layers whose
            output channels are coupled, see :mod:`autoprune.pruning.structured`) and is the
            fraction of the group's channels removed, and ``criterion`` must score channels.
        round_to: Structured only: kept channel counts are rounded to a multiple of this.
        removed_blocks: Structured only: module paths of residual blocks removed as a whole
            (replaced by the identity path).
        schedule: ``"oneshot"``: pruned before fine-tuning. ``"gradual"``: pruned step by step
            on a cubic ramp during fine-tuning; ``"gradual-regrow"``: the same, letting pruned
            weights come back when their score recovers (see :mod:`autoprune.pruning.schedule`).
        quantization: ``"none"``, ``"int8-dynamic"`` or ``"int8-static"``: applied to the
            pruned, fine-tuned model, so the measured accuracy is the quantized model's (see
            :mod:`autoprune.inference.quantize`). Needs the ``onnxruntime`` runtime.
        runtime: ``"pytorch"``: the model is measured as a PyTorch module. ``"onnxruntime"``:
            it is exported to ONNX (and quantized) and measured in ONNX Runtime, as deployed.
        distill: Weight in [0, 1) of distillation from the dense model during fine-tuning
            (0: off); ``lr_scale``: the fine-tune learning rate is the task's times this;
            ``rewind``: replay a high-then-decaying learning-rate schedule instead of the
            task's. All at the task's budget (see :mod:`autoprune.recovery`).

    Raises:
        SpecError: On an unknown criterion, scope, rule, granularity, schedule, quantization
            or runtime, a criterion that cannot score the granularity, a sparsity outside
            [0, 1), structured-only settings on an unstructured policy, or a quantization
            outside ONNX Runtime, or a recovery setting of the wrong type or range.
    """

    sparsity: Mapping[str, float]
    criterion: str = "magnitude"
    scope: str = "layer"
    rule: str = "ratio"
    alpha: float = 1.0
    granularity: str = "unstructured"
    round_to: int = 1
    removed_blocks: tuple[str, ...] = ()
    schedule: str = "oneshot"
    quantization: str = "none"
    runtime: str = "pytorch"
    distill: float = 0.0
    lr_scale: float = 1.0
    rewind: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise SpecError(
                f"unknown granularity {self.granularity!r} (known: {', '.join(GRANULARITIES)})"
            )
        get_criterion(self.criterion, self.granularity)
        self._check_structured_settings()
        if self.scope not in SCOPES:
            raise SpecError(f"unknown scope {self.scope!r} (known: {', '.join(SCOPES)})")
        if self.rule not in RULES:
            raise SpecError(f"unknown rule {self.rule!r} (known: {', '.join(RULES)})")
        if self.schedule not in SCHEDULES:
            raise SpecError(f"unknown schedule {self.schedule!r} (known: {', '.join(SCHEDULES)})")
        if self.quantization not in QUANTIZATIONS:
            raise SpecError(
                f"unknown quantization {self.quantization!r} (known: {', '.join(QUANTIZATIONS)})"
            )
        if self.runtime not in RUNTIMES:
            raise SpecError(f"unknown runtime {self.runtime!r} (known: {', '.join(RUNTIMES)})")
        if self.quantization != "none" and self.runtime != "onnxruntime":
            raise SpecError(
                f"quantization {self.quantization!r} needs runtime 'onnxruntime', "
                f"got {self.runtime!r}"
            )
        if not self.sparsity:
            raise SpecError("a policy must name at least one layer to prune")
        for layer, value in self.sparsity.items():
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise SpecError(f"sparsity of layer {layer!r} must be in [0, 1), got {value!r}")
        alpha = self.alpha
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise SpecError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        self._check_recovery()
        # A private copy, so that changing the caller's dict cannot change the policy.
        object.__setattr__(self, "sparsity", {k: float(v) for k, v in self.sparsity.items()})

    def _check_structured_settings(self) -> None:
        round_to = self.round_to
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise SpecError(f"round_to must be an integer >= 1, got {round_to!r}")
        blocks = self.removed_blocks
        if isinstance(blocks, str) or not all(isinstance(b, str) for b in blocks):
            raise SpecError(f"removed_blocks must be a list of module paths, got {blocks!r}")
        object.__setattr__(self, "removed_blocks", tuple(sorted(blocks)))
        if self.granularity == "unstructured" and (round_to != 1 or blocks):
            raise SpecError("round_to and removed_blocks need granularity 'structured'")
        if self.granularity == "structured" and self.schedule != "oneshot":
            raise SpecError(
                f"schedule {self.schedule!r} needs granularity 'unstructured' (channels are "
                "removed once, before fine-tuning)"
            )

    def _check_recovery(self) -> None:
        distill, lr_scale = self.distill, self.lr_scale
        if not _is_number(distill) or not 0.0 <= distill < 1.0:
            raise SpecError(f"distill must be a number in [0, 1), got {distill!r}")
        if not _is_number(lr_scale) or not 0.0 < lr_scale <= MAX_LR_SCALE:
            raise SpecError(
                f"lr_scale must be a number > 0 and <= {MAX_LR_SCALE:g}, got {lr_scale!r}"
            )
        if not isinstance(self.rewind, bool):
            raise SpecError(f"rewind must be true or false, got {self.rewind!r}")
        object.__setattr__(self, "distill", float(distill))
        object.__setattr__(self, "lr_scale", float(lr_scale))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON, trial user attrs and tables)."""
        data: dict[str, Any] = {
            "sparsity": dict(self.sparsity),
            "criterion": self.criterion,
            "scope": self.scope,
            "rule": self.rule,
            "alpha": self.alpha,
            "schedule": self.schedule,
        }
        if self.granularity != "unstructured":  # unstructured dicts stay as they always were
            data["granularity"] = self.granularity
            data["round_to"] = self.round_to
            data["removed_blocks"] = list(self.removed_blocks)
        if self.runtime != "pytorch":  # so are the dicts of trials measured in PyTorch
            data["quantization"] = self.quantization
            data["runtime"] = self.runtime
        for key, default in RECOVERY_DEFAULTS.items():
            if getattr(self, key) != default:
                data[key] = getattr(self, key)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        return from_dict(cls, data, "policy key")

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls.from_dict(json.loads(text))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
