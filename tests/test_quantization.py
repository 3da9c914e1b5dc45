"""Quantization as a searched dimension: policy, space, objectives, warm starts, trials."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from conftest import make_data
from test_cli import run
from torch import nn

import autoprune
from autoprune import Policy, SearchSpace, Task, WarmStart
from autoprune.errors import SpecError
from autoprune.inference import deploy, int8_operators
from autoprune.measure import check_quantizations
from autoprune.spec import load_spec
from autoprune.study.pick import pick
from autoprune.study.space import structured_heuristic_params, suggest_policy
from autoprune.study.study import replay
from autoprune.study.warm_start import enqueue_warm_starts
from autoprune.train import evaluate

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

QUANTIZING = SearchSpace(
    granularities=["structured"],
    channel_criteria=["l1"],
    scopes=["layer"],
    rules=["ratio"],
    quantizations=["none", "int8-dynamic", "int8-static"],
)


def test_policies_of_pytorch_trials_keep_their_old_dicts() -> None:
    policy = Policy({"a": 0.5})
    assert "quantization" not in policy.to_dict() and policy.runtime == "pytorch"
    q = Policy({"a": 0.5}, quantization="int8-static", runtime="onnxruntime")
    assert q.to_dict()["quantization"] == "int8-static"
    assert Policy.from_json(q.to_json()) == q
    with pytest.raises(SpecError) as info:
        Policy({"a": 0.5}, quantization="int8-static")
    assert str(info.value) == (
        "quantization 'int8-static' needs runtime 'onnxruntime', got 'pytorch'"
    )
    with pytest.raises(SpecError, match="unknown quantization 'int4' \\(known: none, "):
        Policy({"a": 0.5}, quantization="int4", runtime="onnxruntime")
    with pytest.raises(SpecError, match="unknown quantization 'fp8'"):
        SearchSpace(quantizations=["none", "fp8"])


@pytest.mark.parametrize(
    ("objectives", "granularities", "message"),
    [
        (
            ["accuracy", "nonzero_params"],
            ["structured"],
            "objective 'nonzero_params' is blind to quantization: search quantizations "
            "['none', 'int8-static'] with bytes or latency_ms",
        ),
        (
            ["accuracy", "bytes", "macs"],
            ["structured"],
            "objective 'macs' is blind to quantization: search quantizations "
            "['none', 'int8-static'] with bytes or latency_ms",
        ),
        (
            ["accuracy", "bytes"],
            ["unstructured", "structured"],
            "quantizations ['none', 'int8-static'] deploy to ONNX Runtime, whose dense files "
            "and kernels gain nothing from unstructured zeros: search granularities = "
            '["structured"]',
        ),
    ],
)
def test_objectives_blind_to_quantization_are_refused(
    objectives: list[str], granularities: list[str], message: str
) -> None:
    with pytest.raises(SpecError) as info:
        check_quantizations(objectives, ["none", "int8-static"], granularities)
    assert str(info.value) == message
    check_quantizations(objectives, ["none"], granularities)  # no quantization: no objection


def test_a_spec_that_quantizes_with_nonzero_params_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(
        'task = "digits-cnn"\n[space]\ngranularities = ["structured"]\n'
        'quantizations = ["none", "int8-static"]\n'
    )
    with pytest.raises(
        SpecError, match="s.toml: objective 'nonzero_params' is blind to quantization"
    ):
        load_spec(spec)


def test_the_space_draws_quantization_and_measures_every_trial_in_onnx_runtime(
    tiny_task: Task,
) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(12):
        trial = study.ask()
        policy = suggest_policy(trial, QUANTIZING, [], ["features.0", "classifier.1"])
        assert policy.runtime == "onnxruntime"  # "none" trials too: measured alike
        assert policy.quantization == trial.params["quantization"]
        drawn.add(policy.quantization)
        study.tell(trial, 0.0)
    assert drawn == {"none", "int8-dynamic", "int8-static"}
    plain = suggest_policy(study.ask(), SearchSpace(), ["features.0"], model=tiny_task.model)
    assert (plain.runtime, plain.quantization) == ("pytorch", "none")
    params = structured_heuristic_params(QUANTIZING, 0.5, ["g"], quantization="int8-static")
    assert params == {
        "channel_criterion": "l1",
        "rule": "ratio",
        "scope": "layer",
        "channels:g": 0.5,
        "quantization": "int8-static",
        "lr_scale": 1.0,  # the default space searches the rate; warm starts keep the task's
    }
    unquantized = SearchSpace(granularities=["structured"], channel_criteria=["l1"])
    assert structured_heuristic_params(unquantized, 0.5, ["g"], quantization="int8-static") is None


def test_warm_starts_include_prune_then_int8(tiny_task: Task) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    groups = ["features.0", "classifier.1"]
    warm = WarmStart(channel_sparsities=[0.25, 0.5])
    n = enqueue_warm_starts(study, tiny_task, QUANTIZING, [], warm, groups=groups)
    labels = [t.user_attrs["warm_start"] for t in study.trials]
    assert n == 6 and labels == [
        "l1-uniform@0.25",
        "l1-uniform@0.25+int8-dynamic",
        "l1-uniform@0.25+int8-static",
        "l1-uniform@0.5",
        "l1-uniform@0.5+int8-dynamic",
        "l1-uniform@0.5+int8-static",
    ]
    assert [t.system_attrs["fixed_params"]["quantization"] for t in study.trials][:3] == [
        "none",
        "int8-dynamic",
        "int8-static",
    ]


class ConvOnly(nn.Module):
    """Convolutions only: int8-dynamic (Linear/LSTM operators) has nothing to quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x))).mean((2, 3))


def test_a_quantization_the_model_cannot_take_fails_that_trial_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvOnly()
    task = Task(model=model, train=make_data(96, 0), val=make_data(48, 1), finetune_epochs=1)
    space = SearchSpace(
        granularities=["structured"],
        channel_criteria=["l1"],
        scopes=["layer"],
        rules=["ratio"],
        include=["conv"],  # the head's channels are the classes
        quantizations=["none", "int8-dynamic", "int8-static"],
    )
    study = autoprune.search(
        task,
        n_trials=6,  # warm starts take at most half: the three below
        space=space,
        objectives=["accuracy", "bytes"],
        warm_start=WarmStart(channel_sparsities=[0.5]),
    )
    states = [t.state.name for t in study.trials[:3]]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["fail_reason"] == (
        "int8-dynamic quantized no operator of this model (ONNX Runtime's quantizer takes "
        "MatMul/Gemm (Linear), LSTM, GRU or attention operators)"
    )


@pytest.fixture(scope="module")
def quantized_study(resnet_task: Task, tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("quantized")
    storage = f"sqlite:///{directory / 'q.db'}"
    space = SearchSpace(
        granularities=["structured"],
        channel_criteria=["l1"],
        scopes=["layer"],
        rules=["ratio"],
        quantizations=["none", "int8-static"],
    )
    study = autoprune.search(
        resnet_task,
        storage=storage,
        study_name="q",
        n_trials=4,  # warm starts take at most half: the two below first
        space=space,
        objectives=["accuracy", "bytes", "latency_ms"],
        latency=autoprune.measure.Latency(repeats=2, warmup=1),
        warm_start=WarmStart(channel_sparsities=[0.5]),
    )
    return {"study": study, "storage": storage, "task": resnet_task}


def test_quantized_and_unquantized_trials_replay_exactly(quantized_study: dict) -> None:
    study, task = quantized_study["study"], quantized_study["task"]
    trials = study.get_trials()[:2]
    assert [t.user_attrs["warm_start"] for t in trials] == [
        "l1-uniform@0.5",
        "l1-uniform@0.5+int8-static",
    ]
    for trial in trials:
        result = replay(task, trial)
        assert result.deployed is not None
        assert result.policy.quantization == trial.params["quantization"]
        assert result.metrics["accuracy"] == trial.values[0]
        assert result.deployed.file_bytes == trial.values[1]
        int8 = int8_operators(onnx.load_from_string(result.deployed.data))
        assert (int8 > 0) == (result.policy.quantization == "int8-static")
    # The dense reference (relative sizes, hypervolume) is measured as deployed too: fp32 ONNX.
    assert autoprune.read_setup(study).dense["bytes"] == deploy(task.model, task).file_bytes


def test_export_onnx_reproduces_the_recorded_accuracy(
    quantized_study: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage, task = quantized_study["storage"], quantized_study["task"]
    study = optuna.load_study(study_name="q", storage=storage)
    trial = study.trials[1]  # pruned, then int8-static
    assert trial.user_attrs["warm_start"] == "l1-uniform@0.5+int8-static"
    out = tmp_path / "m"
    done = autoprune.export(study, trial.number, out, task=task, format="onnx")
    assert sorted(p.name for p in out.iterdir()) == [
        "export.json",
        "metrics.json",
        "model.onnx",
        "policy.json",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == trial.values[0] and metrics["reproduced"] is True
    assert metrics["bytes"] == (out / "model.onnx").stat().st_size == trial.values[1]
    numbers = metrics["onnx"]
    assert numbers["quantization"] == "int8-static" and numbers["fp32_bytes"] > 0
    assert numbers["fp32_check"]["tolerance_ratio"] <= 1.0
    assert set(numbers["latency_ms"]) == {"batch_1", "batch_64"}
    assert done.metrics["accuracy"] == trial.values[0]
    # Loaded back: ONNX Runtime behind a module, the recorded accuracy on a fresh load.
    loaded = autoprune.load(out)
    assert isinstance(loaded, autoprune.inference.OnnxModel)
    assert loaded.quantization == "int8-static"
    assert evaluate(loaded, task, "val")[0] == trial.values[0]
    assert loaded(task.val[0][:57]).shape == (57, 3)  # dynamic batch
    # A quantized trial has no PyTorch form to export.
    with pytest.raises(SpecError) as info:
        autoprune.export(study, trial.number, tmp_path / "pt", task=task, format="pytorch")
    assert str(info.value) == (
        f"trial {trial.number} is quantized (int8-static): its deployed model is ONNX; "
        "export it with format 'onnx'"
    )
    # The command line: the same files, and what it checked.
    argv = ["export", str(trial.number), "--out", str(tmp_path / "cli"), "--format", "onnx"]
    code, printed, _ = run(
        capsys, *argv, "--task", "conftest:make_resnet_task", "--storage", storage
    )
    assert (
        code == 0
        and (tmp_path / "cli" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    )
    assert f"model.onnx (int8-static): {trial.values[1]:.0f} bytes; ONNX Runtime " in printed
    assert "recorded val accuracy reproduced" in printed
    # pick --max-bytes: on deployed bytes; pick shows the quantization.
    code, printed, _ = run(capsys, "pick", "--max-bytes", "1e9", "--storage", storage)
    chosen = pick(study, max_bytes=1e9)
    assert code == 0 and printed.startswith(f"trial {chosen.number}: accuracy ")
    quantization = chosen.user_attrs["policy"]["quantization"]
    assert f"quantization {quantization};" in printed
    smallest = min(t.values[1] for t in study.best_trials)
    code, _, err = run(capsys, "pick", "--max-bytes", "10", "--storage", storage)
    assert code == 2 and err == (
        f"autoprune: error: no front trial has bytes <= 10 (the smallest has {smallest:g})\n"
    )


def test_the_front_and_report_show_quantization(quantized_study: dict) -> None:
    from autoprune.report.data import front_share, pareto_front, trials_frame

    study = optuna.load_study(study_name="q", storage=quantized_study["storage"])
    front = pareto_front(study)
    assert set(front["quantization"]) <= {"none", "int8-static"}
    share = front_share(trials_frame(study))
    assert set(share[share["aspect"] == "quantization"]["value"]) == {"none", "int8-static"}
