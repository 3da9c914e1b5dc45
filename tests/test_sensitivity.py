"""Sensitivity: per-layer curves without fine-tuning, their offsets, storage, CLI and report."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import new_study

from autoprune import SearchSpace, Task
from autoprune.cli import main
from autoprune.pruning.masks import prunable_layers
from autoprune.run.worker import run_worker
from autoprune.study.sensitivity import (
    SENSITIVITY_ATTR,
    analyze,
    layer_sensitivity,
    sensitivity_offsets,
)
from autoprune.train import evaluate


def test_curves_prune_one_layer_at_a_time(tiny_task: Task) -> None:
    layers = prunable_layers(tiny_task.model)
    curves = layer_sensitivity(tiny_task, layers, sparsities=(0.0, 0.5, 0.99))
    assert list(curves) == layers
    dense = evaluate(tiny_task.model, tiny_task, "val")[0]
    for curve in curves.values():
        assert [s for s, _ in curve] == [0.0, 0.5, 0.99]
        assert curve[0][1] == dense  # nothing pruned: the dense model
        assert all(0.0 <= a <= 1.0 for _, a in curve)
    assert min(curve[-1][1] for curve in curves.values()) < dense  # 99% of a layer hurts


def test_offsets_favour_the_robust_layers() -> None:
    curves = {"robust": [[0.5, 0.99], [0.9, 0.95]], "fragile": [[0.5, 0.9], [0.9, 0.2]]}
    curves["middle"] = [[0.5, 0.95], [0.9, 0.6]]
    offsets = sensitivity_offsets(curves)
    assert offsets["robust"] < offsets["middle"] < offsets["fragile"]
    assert max(abs(v) for v in offsets.values()) == pytest.approx(1.0)
    assert sensitivity_offsets({"a": [[0.5, 0.9]], "b": [[0.5, 0.9]]}) == {"a": 0.0, "b": 0.0}


def test_analyze_stores_the_curves_and_enqueues_the_prior(tiny_task: Task) -> None:
    space = SearchSpace(parametrization="allocation", schedules=["oneshot", "gradual"])
    study = new_study(tiny_task, space=space)
    curves, enqueued = analyze(study, tiny_task, [0.5, 0.9])
    assert study.user_attrs[SENSITIVITY_ATTR] == curves
    assert enqueued == 4  # 2 targets x 2 schedules
    run_worker(study, tiny_task, target=4)
    labels = [t.user_attrs["warm_start"] for t in study.trials]
    assert labels == ["sensitivity@0.5", "sensitivity@0.9"] + [
        "sensitivity@0.5 gradual",
        "sensitivity@0.9 gradual",
    ]
    offsets = sensitivity_offsets(curves)
    assert {
        k[len("offset:") :]: v for k, v in study.trials[0].params.items() if "offset" in k
    } == (pytest.approx(offsets))
    # The per-layer parametrization has no offsets: curves only.
    other = new_study(tiny_task, space=SearchSpace(parametrization="per-layer"))
    assert analyze(other, tiny_task, [0.5])[1] == 0


@pytest.mark.slow
def test_sensitivity_command_prints_stores_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text('task = "digits-mlp"\n[warm_start]\nsparsities = [0.9]\n')
    storage = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["sensitivity", str(spec), "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert out.startswith("val accuracy with one layer pruned (magnitude, no fine-tuning):\n")
    assert "s=0.98" in out and "\n4 " in out  # the output layer's row
    assert out.rstrip().endswith("2 trials enqueued from it")  # 0.9, one-shot and gradual
    report = tmp_path / "r.html"
    assert main(["report", "--storage", storage, "--out", str(report)]) == 0
    assert "Sensitivity: one layer pruned at a time" in report.read_text(encoding="utf-8")
