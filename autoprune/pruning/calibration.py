"""Calibration: the statistics of the dense model that some criteria score with.

A criterion declares the statistics it needs (``needs=("grad",)``); :func:`calibrate` measures
them on the task's first ``calibration_batches`` training batches (a fixed shuffled order, so
that a trial and its replay see the same batches), in one pass, and returns one
:class:`LayerStats` per layer. A study measures them once, for every criterion its space offers,
and shares them with all its trials.

Statistics (:data:`STATISTICS`), each shaped to broadcast against the layer's weight:

- ``grad``: the mean over the calibration batches of ``|dL/dW|``;
- ``grad_sq``: the mean of ``(dL/dW)**2``, the diagonal of the empirical Fisher in its batch
  approximation (squared *batch* gradients, not per-sample ones);
- ``input_norm``: ``||X_j||_2``, the L2 norm of input feature ``j`` of the layer over every
  calibration row (a Linear's tokens; a Conv's batch and spatial positions, for input
  channel ``j``), shaped ``(1, in)`` for a Linear, ``(1, in, 1, 1)`` for a Conv2d, and
  ``(out, in / groups, 1, 1)`` for a grouped Conv2d (each output channel sees its group's
  inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from autoprune.devices import to_device
from autoprune.errors import SpecError
from autoprune.task import Task

STATISTICS = ("grad", "grad_sq", "input_norm")
_GRADIENTS = ("grad", "grad_sq")


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """The calibration statistics of one layer; those not measured are None."""

    grad: Tensor | None = None
    grad_sq: Tensor | None = None
    input_norm: Tensor | None = None

    def transposed(self) -> LayerStats:
        """The statistics of the transposed (2-D) weight: for scoring input columns."""
        return LayerStats(*(None if t is None else t.T for t in dataclasses.astuple(self)))


def check_needs(needs: Iterable[str]) -> tuple[str, ...]:
    """``needs`` as a tuple, each a known statistic; a SpecError naming the first that is not."""
    if isinstance(needs, str):
        raise SpecError(f"needs must be a list of statistics, got {needs!r}")
    needs = tuple(needs)
    for name in needs:
        if name not in STATISTICS:
            raise SpecError(f"unknown statistic {name!r} (known: {', '.join(STATISTICS)})")
    return needs


def calibrate(
    model: nn.Module, task: Task, layers: Sequence[str], needs: Iterable[str]
) -> dict[str, LayerStats]:
    """The statistics ``needs`` of each of ``layers``, on the first ``task.calibration_batches``
    training batches (shuffled with seed 0).

    Measured on the device ``model`` is on, in eval mode (no dropout noise; batch norm uses its
    running statistics), on a fresh graph: gradients are never read from whatever ``.grad`` the
    model holds, and the model's parameters, ``.grad`` and training mode are left as they were.

    Raises:
        SpecError: On an unknown statistic.
    """
    needs = set(check_needs(needs))
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in layers]
    sums: dict[str, list[Tensor]] = {
        stat: [torch.zeros_like(w) for w in weights] for stat in _GRADIENTS if stat in needs
    }
    squares: dict[str, Tensor] = {}  # sum of x_j**2 per input feature
    hooks = [modules[name].register_forward_hook(_recorder(squares, name)) for name in layers]
    if "input_norm" not in needs:
        for hook in hooks:
            hook.remove()
        hooks = []
    device = weights[0].device if weights else torch.device("cpu")
    was_training = model.training
    model.eval()
    n = 0
    # A shuffling DataLoader draws its order from the global RNG: fix it, so that the same
    # batches are used whenever this runs (a trial and its replay), and restore it after.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            for batch in task.batches("train", shuffle=True, seed=0):
                batch = to_device(batch, device)
                with torch.set_grad_enabled(bool(sums)):
                    outputs = task.outputs(model, batch)
                    if sums:
                        grads = torch.autograd.grad(task.loss_of(outputs, batch), weights)
                        for stat, totals in sums.items():
                            for total, g in zip(totals, grads, strict=True):
                                total += g.abs() if stat == "grad" else g.square()
                n += 1
                if n == task.calibration_batches:
                    break
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
    means = {stat: [t / max(n, 1) for t in totals] for stat, totals in sums.items()}
    stats = {}
    for i, name in enumerate(layers):
        fields: dict[str, Tensor] = {stat: values[i] for stat, values in means.items()}
        if "input_norm" in needs:
            fields["input_norm"] = _broadcast(squares.get(name), modules[name])
        stats[name] = LayerStats(**fields)
    return stats


def calibration_gradients(model: nn.Module, task: Task, layers: list[str]) -> dict[str, Tensor]:
    """Mean over ``task.calibration_batches`` training batches of ``|dL/dW|`` for each layer:
    the ``grad`` statistic of :func:`calibrate`."""
    stats = calibrate(model, task, layers, ("grad",))
    return {name: s.grad for name, s in stats.items() if s.grad is not None}


def _recorder(squares: dict[str, Tensor], name: str) -> Any:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0].detach().float()
        # Features first (a Conv's channels are dim 1), then every row or position.
        rows = x.reshape(-1, x.shape[-1]).T if isinstance(module, nn.Linear) else x.transpose(0, 1)
        total = rows.reshape(rows.shape[0], -1).square().sum(dim=1)
        squares[name] = squares[name] + total if name in squares else total

    return hook


def _broadcast(squares: Tensor | None, module: nn.Module) -> Tensor:
    """The norms of the per-input-feature sums of ``squares`` (None: the layer never ran),
    shaped to broadcast against ``module.weight``."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    tail = (1,) * (weight.dim() - 2)
    groups = int(getattr(module, "groups", 1))
    if squares is None:
        squares = weight.new_zeros(weight.shape[1] * groups, dtype=torch.float32)
    norm = squares.sqrt()
    if groups == 1:
        return norm.reshape(1, -1, *tail)
    per_group = weight.shape[0] // groups
    rows = norm.reshape(groups, -1).repeat_interleave(per_group, dim=0)
    return rows.reshape(weight.shape[0], -1, *tail)
