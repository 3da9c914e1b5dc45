"""Transformers: what is not pruned by default, and structured pruning of heads and neurons.

Unstructured pruning of a Hugging Face model leaves out its task head (every layer outside
``model.base_model_prefix``, e.g. ``classifier``) and its embeddings (e.g. ViT's patch
projection) unless an include glob other than ``*`` names them: see :func:`protected_layers`.

Structured pruning of a transformer removes whole attention heads and FFN intermediate
neurons. Torch-Pruning's dependency graph sees the heads as plain channels (it cannot keep a
head's query, key and value rows together without being told the head counts), so the units
are found here by the modules' names and shapes, and removed by module surgery:

- an *attention* unit (BERT's ``attention.self`` with ``query``/``key``/``value`` and its
  sibling ``attention.output.dense``; ViT's ``attention`` with ``q_proj``/``k_proj``/
  ``v_proj``/``o_proj``): one head is ``head_dim`` output rows of the query, key and value
  projections and the same input columns of the output projection;
- a *feed-forward* unit (BERT's ``intermediate.dense`` and ``output.dense``; ViT's
  ``mlp.fc1`` and ``mlp.fc2``): one neuron is an output row of the first layer and an input
  column of the second.

The hidden size (the residual stream) is left whole. Head counts on the attention modules
(``num_attention_heads``, ``all_head_size``) follow, and the model's config gets the FFN width
when every layer keeps the same one (a Hugging Face config has one head count and one
intermediate size for all layers, so per-layer counts live in the export's plan, which
:func:`autoprune.load` replays on the dense architecture).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from collections.abc import Sequence

import torch
from torch import nn

from autoprune.errors import TaskError

# Query, key and value projections of one attention module, by family.
_QKV = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
# The output projection: a child of the attention module, else of its parent (BERT's
# ``attention.output.dense`` beside ``attention.self``).
_OWN_OUTPUT = ("o_proj", "out_proj")
_SIBLING_OUTPUT = "output.dense"
_HEADS_ATTRS = ("num_attention_heads", "num_heads")
_HEAD_DIM_ATTRS = ("attention_head_size", "head_dim")
# The two layers of a feed-forward block, relative to the module that holds them.
_FFN = (("intermediate.dense", "output.dense"), ("fc1", "fc2"))


@dataclasses.dataclass(frozen=True)
class Unit:
    """A transformer part whose heads or neurons are removed together.

    Args:
        name: The attention module (heads) or the FFN's first layer (neurons): the name of its
            channel group in a structured policy and plan.
        kind: ``"heads"`` or ``"neurons"``.
        outputs: Linear layers that lose output rows (query, key, value; or the first layer).
        inputs: Linear layers that lose input columns (the output projection; or the second).
        count: Heads or neurons.
        width: Rows (columns) per head or neuron: ``head_dim``, or 1.
    """

    name: str
    kind: str
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    count: int
    width: int


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (without importing
    transformers: a model can only be one if the package is imported already)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    try:
        return isinstance(model, transformers.PreTrainedModel)
    except Exception:  # a broken or partial install: not a model we know
        return False


def protected_layers(model: nn.Module, layers: Sequence[str]) -> set[str]:
    """Those of ``layers`` that a Hugging Face ``model`` keeps dense unless asked: its task
    head (outside ``base_model_prefix``) and its embeddings. Empty for other models."""
    if not is_hf_model(model):
        return set()
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_base = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)
    base = f"{prefix}." if has_base else ""
    return {
        name
        for name in layers
        if not name.startswith(base) or name.startswith(f"{base}embeddings.")
    }


def named_explicitly(name: str, include: Sequence[str]) -> bool:
    """Whether an include glob other than the catch-all ``*`` matches ``name``."""
    return any(g != "*" and fnmatch.fnmatchcase(name, g) for g in include)


def find_units(model: nn.Module) -> list[Unit]:
    """The attention and feed-forward units of ``model``, in the definition order of their
    names; none for a model without BERT- or ViT-style attention (a pair of layers named like
    an FFN is not enough to call a model a transformer)."""
    modules = dict(model.named_modules())
    units = []
    for path, module in modules.items():
        unit = _attention(path, module, modules) or _feed_forward(path, modules)
        if unit is not None:
            units.append(unit)
    if not any(unit.kind == "heads" for unit in units):
        return []
    order = {name: i for i, name in enumerate(modules)}
    return sorted(units, key=lambda unit: order[unit.name])


def _child(modules: dict[str, nn.Module], path: str, rel: str) -> nn.Linear | None:
    module = modules.get(f"{path}.{rel}" if path else rel)
    return module if isinstance(module, nn.Linear) else None


def _attention(path: str, module: nn.Module, modules: dict[str, nn.Module]) -> Unit | None:
    heads = next((getattr(module, a) for a in _HEADS_ATTRS if hasattr(module, a)), None)
    head_dim = next((getattr(module, a) for a in _HEAD_DIM_ATTRS if hasattr(module, a)), None)
    if not isinstance(heads, int) or not isinstance(head_dim, int) or heads < 1:
        return None
    if getattr(module, "num_key_value_groups", 1) != 1:  # grouped-query attention: not ours
        return None
    for names in _QKV:
        qkv = [_child(modules, path, n) for n in names]
        if any(layer is None for layer in qkv):
            continue
        width = heads * head_dim
        if any(layer.out_features != width for layer in qkv if layer is not None):
            return None
        parent = path.rpartition(".")[0]
        candidates = [f"{path}.{n}" if path else n for n in _OWN_OUTPUT]
        candidates.append(f"{parent}.{_SIBLING_OUTPUT}" if parent else _SIBLING_OUTPUT)
        output = next((c for c in candidates if isinstance(modules.get(c), nn.Linear)), None)
        if output is None or modules[output].in_features != width:  # type: ignore[union-attr]
            return None
        outputs = tuple(f"{path}.{n}" if path else n for n in names)
        return Unit(path, "heads", outputs, (output,), heads, head_dim)
    return None


def _feed_forward(path: str, modules: dict[str, nn.Module]) -> Unit | None:
    for first, second in _FFN:
        up, down = _child(modules, path, first), _child(modules, path, second)
        if (
            up is not None
            and down is not None
            and down.in_features == up.out_features
            and down.out_features == up.in_features  # back onto the residual stream
        ):
            names = [f"{path}.{n}" if path else n for n in (first, second)]
            return Unit(names[0], "neurons", (names[0],), (names[1],), up.out_features, 1)
    return None


def kept_rows(unit: Unit, removed: Sequence[int]) -> list[int]:
    """Row indices of ``unit``'s output layers (columns of its input layers) that stay when
    heads or neurons ``removed`` go.

    Raises:
        TaskError: If an index is out of range, or every head or neuron would go.
    """
    gone = set(removed)
    if any(not 0 <= i < unit.count for i in gone):
        bad = max(gone) if max(gone) >= unit.count else min(gone)
        raise TaskError(
            f"the plan removes {unit.kind[:-1]} {bad} of {unit.name!r}, which has {unit.count}"
        )
    kept = [i for i in range(unit.count) if i not in gone]
    if not kept:
        raise TaskError(f"the plan removes every {unit.kind[:-1]} of {unit.name!r}")
    return [i * unit.width + j for i in kept for j in range(unit.width)]


def remove(model: nn.Module, unit: Unit, removed: Sequence[int]) -> None:
    """Remove heads or neurons ``removed`` (indices into the dense model's) from ``unit`` of
    ``model`` in place, and update the attention module's head counts."""
    rows = torch.tensor(kept_rows(unit, removed))
    with torch.no_grad():
        for name in unit.outputs:
            layer = _linear(model, name)
            _replace(layer, "weight", layer.weight[rows])
            if layer.bias is not None:
                _replace(layer, "bias", layer.bias[rows])
            layer.out_features = len(rows)
        for name in unit.inputs:
            layer = _linear(model, name)
            _replace(layer, "weight", layer.weight[:, rows])
            layer.in_features = len(rows)
    if unit.kind == "heads":
        attention = model.get_submodule(unit.name)
        heads = len(rows) // unit.width
        for attr in _HEADS_ATTRS:
            if hasattr(attention, attr):
                setattr(attention, attr, heads)
        if hasattr(attention, "all_head_size"):
            setattr(attention, "all_head_size", len(rows))  # noqa: B010 (an nn.Module)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    layer = model.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise TaskError(f"layer {name!r} is a {type(layer).__name__}, not a Linear layer")
    return layer


def _replace(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(layer, name)
    setattr(layer, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))


def zero(model: nn.Module, unit: Unit, removed: Sequence[int]) -> None:
    """The masked equivalent of :func:`remove`: zero, in place, the rows and columns of the
    heads or neurons ``removed``."""
    kept = set(kept_rows(unit, removed))
    rows = [i for i in range(unit.count * unit.width) if i not in kept]
    with torch.no_grad():
        for name in unit.outputs:
            layer = _linear(model, name)
            layer.weight[rows] = 0.0
            if layer.bias is not None:
                layer.bias[rows] = 0.0
        for name in unit.inputs:
            _linear(model, name).weight[:, rows] = 0.0


def lost_params(model: nn.Module, unit: Unit, removed: Sequence[int]) -> int:
    """Parameters :func:`remove` takes away: each removed row or column with its bias."""
    rows = unit.count * unit.width - len(kept_rows(unit, removed))
    lost = 0
    for name in unit.outputs:
        layer = _linear(model, name)
        lost += rows * (layer.in_features + (layer.bias is not None))
    for name in unit.inputs:
        lost += rows * _linear(model, name).out_features
    return lost


def update_config(model: nn.Module, units: Sequence[Unit]) -> None:
    """Write the FFN width into ``model.config.intermediate_size`` when every feed-forward unit
    has the same one (a config cannot say anything finer)."""
    config = getattr(model, "config", None)
    widths = {model.get_submodule(u.outputs[0]).out_features for u in units if u.kind == "neurons"}
    if config is not None and len(widths) == 1 and hasattr(config, "intermediate_size"):
        config.intermediate_size = widths.pop()
