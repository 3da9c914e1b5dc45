"""Masks: torch.nn.utils.prune's invariants, exact counts of every rule and scope, layers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import TinyCNN
from torch import nn

from autoprune import Policy, TaskError, apply_masks, compute_masks, fold_masks, prunable_layers
from autoprune.pruning.masks import count_nonzero, layer_sparsity

LAYERS = ["features.0", "classifier.1", "classifier.3"]
SIZES = {"features.0": 36, "classifier.1": 1024, "classifier.3": 48}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN()


def _random_masks(model: nn.Module, seed: int = 0, density: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    return {name: torch.rand(modules[name].weight.shape, generator=g) < density for name in LAYERS}


def _inputs(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def _random_scores(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = _model()
    modules = dict(model.named_modules())
    return {name: torch.rand(modules[name].weight.shape, generator=g) for name in LAYERS}


def _pruned(mask: torch.Tensor) -> int:
    return int((~mask).sum())


# --- the mask invariants of torch.nn.utils.prune -------------------------------------------


def test_mask_has_parameter_shape_and_weight_is_orig_times_mask() -> None:
    model = _model()
    masks = _random_masks(model)
    apply_masks(model, masks)
    modules = dict(model.named_modules())
    for name in LAYERS:
        m = modules[name]
        assert m.weight_mask.shape == m.weight_orig.shape
        assert torch.equal(m.weight_mask, masks[name].float())
        assert torch.equal(m.weight, m.weight_orig * m.weight_mask)
        assert "weight_mask" in dict(m.named_buffers())
        assert "weight_orig" in dict(m.named_parameters())
        assert "weight" not in dict(m.named_parameters())
    # The weight follows the original after it changes (the hook recomputes it each forward).
    with torch.no_grad():
        modules["classifier.1"].weight_orig.add_(1.0)
    model(_inputs())
    m = modules["classifier.1"]
    assert torch.equal(m.weight, m.weight_orig * m.weight_mask)


def test_all_ones_mask_changes_neither_forward_nor_backward() -> None:
    dense, masked = _model(), _model()
    modules = dict(masked.named_modules())
    apply_masks(masked, {name: torch.ones_like(modules[name].weight) for name in LAYERS})
    x, y = _inputs(), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out_dense, out_masked = dense(x), masked(x)
    assert torch.equal(out_dense, out_masked)
    nn.functional.cross_entropy(out_dense, y).backward()
    nn.functional.cross_entropy(out_masked, y).backward()
    dense_modules = dict(dense.named_modules())
    for name in LAYERS:
        assert torch.equal(dense_modules[name].weight.grad, modules[name].weight_orig.grad)
        assert torch.equal(dense_modules[name].bias.grad, modules[name].bias.grad)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.Adam(params, lr=1e-2),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        # Weight decay moves the stored originals, but the weights forward sees stay zero.
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adam", "sgd-momentum", "sgd-momentum-decay"],
)
def test_pruned_weights_get_zero_grad_and_stay_zero(make_optimizer) -> None:
    model = _model()
    masks = _random_masks(model, seed=1, density=0.4)
    apply_masks(model, masks)
    modules = dict(model.named_modules())
    # Made before any step, on the parameters as they are after masking.
    optimizer = make_optimizer(model.parameters())
    x = _inputs(16)
    y = torch.arange(16) % 3
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for name in LAYERS:
            grad = modules[name].weight_orig.grad
            assert torch.equal(grad[~masks[name]], torch.zeros(_pruned(masks[name])))
            assert grad[masks[name]].abs().sum() > 0  # the kept weights do learn
        optimizer.step()
    model(x)  # recompute the masked weights from the stepped originals
    for name in LAYERS:
        weight = modules[name].weight
        assert torch.equal(weight[~masks[name]], torch.zeros(_pruned(masks[name])))
        assert int(torch.count_nonzero(weight)) == int(masks[name].sum())


def test_parameter_object_survives_masking() -> None:
    model = _model()
    modules = dict(model.named_modules())
    before = {name: modules[name].weight for name in LAYERS}
    ids_before = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    apply_masks(model, _random_masks(model))
    for name in LAYERS:
        assert modules[name].weight_orig is before[name]
    assert sorted(id(p) for p in model.parameters()) == sorted(ids_before)
    # The optimizer made before masking still updates the model's parameters.
    optimizer_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimizer_ids == set(ids_before)


def test_state_dict_round_trips_into_a_freshly_masked_copy() -> None:
    model = _model(0)
    apply_masks(model, _random_masks(model, seed=3))
    state = model.state_dict()
    assert {f"{name}.weight_orig" for name in LAYERS} <= set(state)
    assert {f"{name}.weight_mask" for name in LAYERS} <= set(state)

    fresh = _model(1)
    fresh_modules = dict(fresh.named_modules())
    apply_masks(fresh, {name: torch.ones_like(fresh_modules[name].weight) for name in LAYERS})
    fresh.load_state_dict(state)
    x = _inputs()
    assert torch.equal(fresh(x), model(x))
    modules = dict(model.named_modules())
    for name in LAYERS:
        assert torch.equal(fresh_modules[name].weight, modules[name].weight)
        assert torch.equal(fresh_modules[name].weight_mask, modules[name].weight_mask)


def _train_step(model: nn.Module) -> None:
    x = _inputs(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), torch.arange(16) % 3).backward()
    optimizer.step()


def _no_grad_forward(model: nn.Module) -> None:
    _train_step(model)
    # A training forward leaves a non-leaf weight, which copy.deepcopy refuses (pytorch#37322);
    # a forward without grad recomputes it as a plain tensor.
    with torch.no_grad():
        model(_inputs())


@pytest.mark.parametrize(
    ("clone", "prepare"),
    [
        (copy.deepcopy, lambda m: None),
        (copy.deepcopy, _no_grad_forward),
        (lambda m: pickle.loads(pickle.dumps(m)), lambda m: None),
        (lambda m: pickle.loads(pickle.dumps(m)), _train_step),
    ],
    ids=["deepcopy", "deepcopy-after-training", "pickle", "pickle-after-training"],
)
def test_masked_model_round_trips(clone, prepare) -> None:
    model = _model()
    masks = _random_masks(model, seed=4)
    apply_masks(model, masks)
    prepare(model)
    other = clone(model)
    x = _inputs()
    assert torch.equal(other(x), model(x))
    # The copy keeps its own working masks: moving its originals does not revive pruned weights.
    other_modules = dict(other.named_modules())
    with torch.no_grad():
        for name in LAYERS:
            other_modules[name].weight_orig.add_(1.0)
    other(x)
    for name in LAYERS:
        w = other_modules[name].weight
        assert torch.equal(w[~masks[name]], torch.zeros(_pruned(masks[name])))
        assert torch.equal(w, other_modules[name].weight_orig * other_modules[name].weight_mask)
    assert not torch.equal(other(x), model(x))  # the copy shares nothing with the original


def test_fold_masks_leaves_plain_weights_with_exact_zeros() -> None:
    model = _model()
    masks = _random_masks(model, seed=5)
    apply_masks(model, masks)
    x = _inputs()
    before = model(x)
    fold_masks(model)
    modules = dict(model.named_modules())
    for name in LAYERS:
        m = modules[name]
        assert isinstance(m.weight, nn.Parameter)
        assert dict(m.named_parameters()).keys() == {"weight", "bias"}
        assert not list(m.named_buffers())
        assert not m._forward_pre_hooks
        assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")
        assert torch.equal(m.weight[~masks[name]], torch.zeros(_pruned(masks[name])))
        assert int(torch.count_nonzero(m.weight)) == int(masks[name].sum())
    assert torch.equal(model(x), before)
    assert set(model.state_dict()) == set(_model().state_dict())
    fold_masks(model)  # folding twice is harmless
    assert torch.equal(model(x), before)


# --- exact counts ----------------------------------------------------------------------------

SPARSITY_SEEDS = range(5)


def _random_sparsity(seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(100 + seed)
    values = (torch.rand(len(LAYERS), generator=g) * 0.99).tolist()
    if seed == 0:
        values[0], values[1] = 0.0, 0.99
    return dict(zip(LAYERS, values, strict=True))


@pytest.mark.parametrize("seed", SPARSITY_SEEDS)
def test_ratio_layer_prunes_round_s_n_in_each_layer(seed: int) -> None:
    scores = _random_scores(seed)
    sparsity = _random_sparsity(seed)
    masks = compute_masks(Policy(sparsity, rule="ratio", scope="layer"), scores)
    assert set(masks) == set(LAYERS)
    for name in LAYERS:
        n = SIZES[name]
        assert masks[name].dtype == torch.bool and masks[name].shape == scores[name].shape
        pruned = _pruned(masks[name])
        assert pruned == round(sparsity[name] * n)
        assert abs(pruned - sparsity[name] * n) <= 0.5
        # The lowest scores go: every pruned score is below every kept one.
        if 0 < pruned < n:
            assert scores[name][~masks[name]].max() < scores[name][masks[name]].min()


def test_ratio_layer_edge_sparsities() -> None:
    scores = _random_scores(0)
    zero = compute_masks(Policy(dict.fromkeys(LAYERS, 0.0)), scores)
    assert all(bool(mask.all()) for mask in zero.values())
    high = compute_masks(Policy(dict.fromkeys(LAYERS, 0.99)), scores)
    assert {name: _pruned(high[name]) for name in LAYERS} == {
        name: round(0.99 * SIZES[name]) for name in LAYERS
    }


def test_ratio_ties_are_broken_by_position() -> None:
    scores = {name: torch.zeros(SIZES[name]) for name in LAYERS}
    masks = compute_masks(Policy(dict.fromkeys(LAYERS, 0.5)), scores)
    for name in LAYERS:
        k = round(0.5 * SIZES[name])
        assert not masks[name][:k].any() and masks[name][k:].all()


@pytest.mark.parametrize("seed", SPARSITY_SEEDS)
def test_ratio_global_prunes_the_total_and_the_globally_lowest(seed: int) -> None:
    scores = _random_scores(seed)
    # Layers on different scales, so that the global split differs from the per-layer one.
    scores["classifier.1"] = scores["classifier.1"] * 0.5
    sparsity = _random_sparsity(seed)
    masks = compute_masks(Policy(sparsity, rule="ratio", scope="global"), scores)
    total = sum(_pruned(masks[name]) for name in LAYERS)
    assert total == round(sum(sparsity[name] * SIZES[name] for name in LAYERS))
    pruned = torch.cat([scores[name][~masks[name]] for name in LAYERS])
    kept = torch.cat([scores[name][masks[name]] for name in LAYERS])
    if len(pruned) and len(kept):
        assert pruned.max() < kept.min()


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("seed", range(3))
def test_mean_rule_prunes_below_alpha_mean_up_to_the_cap(
    scope: str, alpha: float, seed: int
) -> None:
    scores = _random_scores(seed)
    scores["features.0"] = scores["features.0"] * 3.0  # pooled and per-layer means differ
    sparsity = _random_sparsity(seed)
    masks = compute_masks(Policy(sparsity, rule="mean", scope=scope, alpha=alpha), scores)
    pooled_mean = torch.cat([scores[name].flatten() for name in LAYERS]).mean()
    for name in LAYERS:
        flat, keep = scores[name].flatten(), masks[name].flatten()
        threshold = alpha * (pooled_mean if scope == "global" else flat.mean())
        below = flat < threshold
        cap = round(sparsity[name] * SIZES[name])
        pruned = _pruned(keep)
        assert pruned == min(int(below.sum()), cap)
        assert not (~keep & ~below).any(), "pruned a weight scoring at or above the threshold"
        if int(below.sum()) <= cap:
            assert torch.equal(~keep, below)
        elif pruned > 0:
            assert flat[~keep].max() < flat[keep].min()


def test_mean_rule_with_uncapped_layers_prunes_exactly_the_weights_below_the_mean() -> None:
    scores = {
        "a": torch.tensor([1.0, 2.0, 3.0, 10.0]),
        "b": torch.tensor([[5.0, 1.0], [0.0, 6.0]]),
    }
    layer = compute_masks(Policy({"a": 0.9, "b": 0.9}, rule="mean"), scores)
    assert layer["a"].tolist() == [False, False, False, True]  # mean 4
    assert layer["b"].tolist() == [[True, False], [False, True]]  # mean 3
    pooled = compute_masks(Policy({"a": 0.9, "b": 0.9}, rule="mean", scope="global"), scores)
    # Pooled mean 28/8 = 3.5.
    assert pooled["a"].tolist() == [False, False, False, True]
    assert pooled["b"].tolist() == [[True, False], [False, True]]
    capped = compute_masks(Policy({"a": 0.25, "b": 0.0}, rule="mean", alpha=2.0), scores)
    assert capped["a"].tolist() == [False, True, True, True]
    assert capped["b"].all()


def test_compute_masks_only_covers_the_policy_layers() -> None:
    scores = _random_scores(0)
    masks = compute_masks(Policy({"classifier.1": 0.5}), scores)
    assert list(masks) == ["classifier.1"]


# --- prunable layers and counting -------------------------------------------------------------


def test_prunable_layers_in_definition_order() -> None:
    assert prunable_layers(TinyCNN()) == LAYERS


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["classifier.*"], [], ["classifier.1", "classifier.3"]),
        (["*"], ["classifier.3"], ["features.0", "classifier.1"]),
        (["features.*", "classifier.3"], [], ["features.0", "classifier.3"]),
        (["*.?"], ["features*"], ["classifier.1", "classifier.3"]),
        (["classifier.1"], ["*.3"], ["classifier.1"]),
    ],
)
def test_prunable_layers_globs(include, exclude, expected) -> None:
    assert prunable_layers(TinyCNN(), include, exclude) == expected


def test_prunable_layers_globs_are_case_sensitive() -> None:
    with pytest.raises(TaskError):
        prunable_layers(TinyCNN(), ["Classifier.*"])


def test_prunable_layers_no_layer_error() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(
        TaskError, match=r"^model Sequential has no prunable Linear or Conv layer$"
    ):
        prunable_layers(model)


def test_prunable_layers_globs_match_none_error() -> None:
    with pytest.raises(TaskError) as info:
        prunable_layers(TinyCNN(), ["nothing*"], ["features.0"])
    assert str(info.value) == (
        "include ['nothing*'] / exclude ['features.0'] match no prunable layer "
        "(layers: features.0, classifier.1, classifier.3)"
    )
    with pytest.raises(TaskError, match=r"include \['\*'\] / exclude \['\*'\] match no"):
        prunable_layers(TinyCNN(), exclude=["*"])


def test_count_nonzero_and_layer_sparsity_are_exact() -> None:
    model = _model()
    masks = _random_masks(model, seed=6, density=0.3)
    masks["classifier.3"] = torch.zeros(3, 16, dtype=torch.bool)
    masks["features.0"] = torch.ones(4, 1, 3, 3, dtype=torch.bool)
    apply_masks(model, masks)
    kept = {name: int(masks[name].sum()) for name in LAYERS}
    assert count_nonzero(model, LAYERS) == (sum(kept.values()), sum(SIZES.values()))
    assert count_nonzero(model, ["classifier.1"]) == (kept["classifier.1"], 1024)
    sparsity = layer_sparsity(model, LAYERS)
    assert sparsity == {name: 1.0 - kept[name] / SIZES[name] for name in LAYERS}
    assert sparsity["classifier.3"] == 1.0 and sparsity["features.0"] == 0.0
    fold_masks(model)
    assert count_nonzero(model, LAYERS) == (sum(kept.values()), sum(SIZES.values()))
    assert layer_sparsity(model, LAYERS) == sparsity
