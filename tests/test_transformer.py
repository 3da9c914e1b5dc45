"""Transformers: Hugging Face models keep their head and embeddings dense by default; attention
heads and FFN neurons are removed for real, to the predicted size, and reload from an export."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import TinyCNN, fake_stats
from torch import nn

import autoprune
from autoprune import Policy, SearchSpace, TaskError
from autoprune.pruning import transformer
from autoprune.pruning.criteria import criteria_for, get_criterion
from autoprune.pruning.masks import prunable_layers
from autoprune.pruning.sizes import predict_params
from autoprune.pruning.structured import (
    Plan,
    apply_plan,
    channel_groups,
    group_sizes,
    kept_channels,
    plan,
    removable_blocks,
    zero_channels,
)
from autoprune.study.setup import read_setup
from autoprune.study.study import materialize
from autoprune.task import default_forward
from autoprune.tasks.digits import digits_mlp_model
from autoprune.train import fit

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 12, 10


def tiny_bert(seed: int = 0) -> nn.Module:
    """2 layers, 4 heads of 4, FFN 24; 3 classes."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=LENGTH,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def tiny_vit(seed: int = 0) -> nn.Module:
    """8×8 one-channel images in 4 patches, 2 layers, 4 heads of 4 (no q/k/v bias), FFN 24."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        qkv_bias=False,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config).eval()


def bert_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Token sequences whose class is which of tokens 1, 2, 3 they hold most of."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    ids[:, 1:5] = (labels + 1)[:, None]
    return {"input_ids": ids, "labels": labels}


MODELS = {
    "bert": (tiny_bert, lambda: bert_batch(5, 0)),
    "vit": (tiny_vit, lambda: {"pixel_values": torch.rand(5, 1, 8, 8)}),
}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_units_of_bert_and_vit() -> None:
    bert_units = transformer.find_units(tiny_bert())
    assert [(u.name, u.kind, u.count, u.width) for u in bert_units[:2]] == [
        ("bert.encoder.layer.0.attention.self", "heads", 4, 4),
        ("bert.encoder.layer.0.intermediate.dense", "neurons", 24, 1),
    ]
    assert bert_units[0].outputs == tuple(
        f"bert.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")
    )
    assert bert_units[0].inputs == ("bert.encoder.layer.0.attention.output.dense",)
    assert bert_units[1].inputs == ("bert.encoder.layer.0.output.dense",)
    assert len(bert_units) == 4
    vit_units = transformer.find_units(tiny_vit())
    assert [u.name for u in vit_units] == [
        "vit.layers.0.attention",
        "vit.layers.0.mlp.fc1",
        "vit.layers.1.attention",
        "vit.layers.1.mlp.fc1",
    ]
    assert vit_units[0].inputs == ("vit.layers.0.attention.o_proj",)


class TwoLayers(nn.Module):
    """Named like an FFN (fc1, fc2), but no attention: not a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("factory", [TinyCNN, digits_mlp_model, TwoLayers])
def test_other_models_have_no_units_and_keep_every_layer(factory: Any) -> None:
    model = factory()
    assert transformer.find_units(model) == []
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert prunable_layers(model) == linear  # the output layer too, as before


def test_hf_head_and_embeddings_are_kept_dense_unless_named() -> None:
    bert = tiny_bert()
    layers = prunable_layers(bert)
    assert "classifier" not in layers and "bert.pooler.dense" in layers
    assert len(layers) == 2 * 6 + 1  # q, k, v, attention output, FFN in and out; the pooler
    assert prunable_layers(bert, ["*", "classifier"]) == [*layers, "classifier"]
    assert prunable_layers(bert, ["classifier"]) == ["classifier"]
    vit = tiny_vit()
    assert not any("embeddings" in n or n == "classifier" for n in prunable_layers(vit))
    assert prunable_layers(vit, ["vit.embeddings.*"]) == [
        "vit.embeddings.patch_embeddings.projection"
    ]
    with pytest.raises(TaskError, match="head and embeddings: .*classifier"):
        prunable_layers(bert, ["*"], ["bert.*"])


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("criterion", criteria_for("structured"))
def test_heads_and_neurons_contract(arch: str, criterion: str) -> None:
    """A structured policy removes heads and neurons: the smaller model runs, computes what
    the model with those rows and columns zeroed computes, and has the predicted size."""
    factory, make_batch = MODELS[arch]
    model, batch = factory(), make_batch()
    groups = channel_groups(model, batch)
    assert [g.kind for g in groups] == ["heads", "neurons"] * 2
    ratios = (0.5, 0.3, 0.75, 0.0)
    policy = Policy(
        {g.name: ratios[i] for i, g in enumerate(groups)},
        criterion=criterion,
        granularity="structured",
    )
    stats = fake_stats(model, (nn.Linear,))
    if get_criterion(criterion).channel_source == "batchnorm":
        with pytest.raises(TaskError, match="has no BatchNorm"):
            plan(model, policy, groups, stats)
        return
    torch.manual_seed(0)
    result = plan(model, policy, groups, stats)
    assert {k: len(v) for k, v in result.channels.items()} == {
        groups[0].name: 2,
        groups[1].name: 7,
        groups[2].name: 3,
    }
    pruned = apply_plan(copy.deepcopy(model), result, batch)
    masked = zero_channels(copy.deepcopy(model), result, batch)
    torch.testing.assert_close(logits(pruned, batch), logits(masked, batch))
    size = sum(p.numel() for p in pruned.parameters())
    assert size == predict_params(model, result, batch)
    assert size < sum(p.numel() for p in model.parameters())
    units = transformer.find_units(pruned)
    assert [u.count for u in units] == [2, 17, 1, 24]
    attention = pruned.get_submodule(groups[2].name)
    assert attention.num_attention_heads == 1
    assert getattr(attention, "all_head_size", 4) == 4
    assert model.get_submodule(groups[2].name).num_attention_heads == 4  # the model is untouched
    assert pruned.config.intermediate_size == 24  # the layers differ: the config cannot say


def test_uniform_ffn_width_reaches_the_config_and_heads_round_by_rows() -> None:
    model, batch = tiny_bert(), bert_batch(5, 0)
    groups = channel_groups(model, batch)
    # round_to counts rows: 8 rows are 2 heads of 4, and 8 neurons.
    policy = Policy(
        {g.name: 0.4 for g in groups}, criterion="l1", granularity="structured", round_to=8
    )
    result = plan(model, policy, groups)
    pruned = apply_plan(copy.deepcopy(model), result, batch)
    assert [u.count for u in transformer.find_units(pruned)] == [2, 16, 2, 16]
    sizes = group_sizes(model, [g.name for g in groups])
    assert [kept_channels(c, 0.4, 8, u) for c, u in sizes] == [2, 16, 2, 16]
    assert pruned.config.intermediate_size == 16
    assert model.config.intermediate_size == 24


def test_a_plan_that_does_not_fit_is_one_line() -> None:
    model = tiny_bert()
    name = "bert.encoder.layer.0.attention.self"
    with pytest.raises(TaskError, match=f"removes head 4 of '{name}', which has 4"):
        apply_plan(model, Plan({name: (1, 4)}), None)
    with pytest.raises(TaskError, match=f"removes every head of '{name}'"):
        apply_plan(model, Plan({name: (0, 1, 2, 3)}), None)


def bert_task() -> autoprune.Task:
    """A tiny BERT fine-tuned on :func:`bert_batch` data: dict batches, the model's own loss."""
    model = tiny_bert()
    task = autoprune.Task(
        model=model,
        train=bert_batch(96, 1),
        val=bert_batch(48, 2),
        test=bert_batch(48, 3),
        finetune_epochs=1,
        batch_size=16,
        lr=3e-3,
        name="tiny-bert",
    )
    fit(model, task, epochs=3, seed=0)
    model.eval()
    return task


def test_structured_search_exports_and_reloads(tmp_path: Path) -> None:
    """Trials of a structured study of a Hugging Face model export their smaller model, which
    reloads on the dense architecture with the very same outputs and size."""
    task = bert_task()
    space = SearchSpace(
        granularities=["structured"], channel_criteria=["l1", "taylor"], scopes=["layer"]
    )
    study = autoprune.search(
        task,
        n_trials=3,
        storage=f"sqlite:///{tmp_path / 'run.db'}",
        space=space,
        objectives=["accuracy", "macs"],
        seed=0,
    )
    trial = study.trials[0]  # the first warm start: uniform L1 at 0.2, 1 head and 5 neurons
    done = autoprune.export(study, trial.number, tmp_path / "out", task=task)
    manifest = json.loads((done.directory / "export.json").read_text())
    removed = {name: len(idxs) for name, idxs in manifest["plan"]["channels"].items()}
    assert removed == {
        name: 1 if name.endswith(".self") else 5 for name in read_setup(study).groups
    }
    model = autoprune.load(done.directory, task=task)
    replayed = materialize(task, trial).eval()
    batch = task.example(8)
    torch.testing.assert_close(logits(model, batch), logits(replayed, batch), rtol=0, atol=0)
    assert done.metrics["model_params"] == sum(p.numel() for p in model.parameters())
    plan_ = Plan.from_dict(manifest["plan"])
    assert done.metrics["model_params"] == predict_params(task.model, plan_, batch)
    assert done.metrics["accuracy"] == trial.values[0]


def test_unstructured_search_of_a_hf_model_leaves_its_head_dense() -> None:
    task = bert_task()
    study = autoprune.search(task, n_trials=2, seed=0)
    layers = read_setup(study).layers
    assert "classifier" not in layers and len(layers) == 13
    for trial in study.trials:
        assert set(trial.user_attrs["policy"]["sparsity"]) == set(layers)
    total = sum(task.model.get_submodule(name).weight.numel() for name in layers)
    assert study.trials[0].params["density"] == 0.5  # the first warm start
    assert study.trials[0].values[1] == total / 2  # nonzero weights of the 13 layers alone


@pytest.mark.slow
def test_digits_bert_spec_searches_exports_and_reloads_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The built-in transformer task through the CLI and its shipped spec (cut to two trials of
    one epoch): a structured trial exports, and ``load`` rebuilds it from the task's name."""
    from autoprune.cli import main
    from autoprune.tasks import load_task
    from autoprune.train import evaluate

    spec = (Path(__file__).parent.parent / "studies" / "digits_bert_heads.toml").read_text()
    spec = spec.replace("trials = 30", "trials = 2").replace("epochs = 2", "epochs = 1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bert.toml").write_text(spec, encoding="utf-8")
    task = load_task("digits-bert")  # trained (or loaded) before the run, which then logs less
    assert main(["search", "bert.toml", "-q"]) == 0
    study = optuna.load_study(study_name="digits-bert-heads", storage="sqlite:///autoprune.db")
    trial = study.trials[0]  # uniform L1 at 0.2: 1 of 4 heads and 26 of 128 neurons per layer
    assert main(["export", str(trial.number), "--out", "m"]) == 0
    capsys.readouterr()
    model = autoprune.load(tmp_path / "m")
    assert [u.count for u in transformer.find_units(model)] == [3, 102, 3, 102]
    assert model.config.intermediate_size == 102
    assert evaluate(model, task, "val")[0] == trial.values[0]
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in task.model.parameters()
    )


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_a_whole_encoder_layer_goes_with_heads_of_another(arch: str) -> None:
    factory, make_batch = MODELS[arch]
    model, batch = factory(), make_batch()
    groups = channel_groups(model, batch)
    block = groups[2].name.rsplit(".attention", 1)[0]  # the second encoder layer
    assert removable_blocks(model, batch, [block], forward=default_forward) == [block]
    policy = Policy(
        {g.name: 0.5 for g in groups},
        criterion="l1",
        granularity="structured",
        removed_blocks=(block,),
    )
    result = plan(model, policy, groups)
    assert set(result.channels) == {groups[0].name, groups[1].name}
    pruned = apply_plan(copy.deepcopy(model), result, batch)
    assert isinstance(pruned.get_submodule(block), nn.Identity)
    assert [u.count for u in transformer.find_units(pruned)] == [2, 12]
    assert logits(pruned, batch).shape == (5, 3)
    assert sum(p.numel() for p in pruned.parameters()) == predict_params(model, result, batch)


def test_transformers_is_imported_only_by_the_task_that_needs_it() -> None:
    import subprocess
    import sys

    code = (
        "import sys, autoprune, autoprune.cli, autoprune.tasks\n"
        "from autoprune.pruning import structured, transformer\n"
        "assert 'transformers' not in sys.modules\n"
        "assert not transformer.is_hf_model(autoprune.tasks.digits.digits_mlp_model())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
