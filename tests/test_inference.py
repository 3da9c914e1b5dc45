"""The model as deployed: ONNX export, ONNX Runtime behind a module, int8 quantization."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_data
from torch import nn

import autoprune
from autoprune import Task
from autoprune.errors import DeployFailed, SpecError
from autoprune.inference import OnnxModel, deploy, export_onnx, int8_operators, require_onnx
from autoprune.task import default_forward
from autoprune.train import evaluate, fit

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def mlp_task() -> Task:
    """A Linear-only model big enough that int8 weights dominate its file."""
    torch.manual_seed(0)
    x, y = make_data(256, 0)
    vx, vy = make_data(96, 1)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 3),
    )
    task = Task(model=model, train=(x, y), val=(vx, vy), finetune_epochs=1, name="mlp")
    fit(model, task, epochs=3, seed=0)
    return task


@pytest.fixture(scope="module")
def mlp() -> Task:
    return mlp_task()


def test_onnx_model_matches_pytorch_at_any_batch_size(tiny_task: Task) -> None:
    model = tiny_task.model.eval()
    exported = export_onnx(model, tiny_task.example(2), tiny_task.forward)
    assert exported.file_bytes == len(exported.data) and exported.quantization == "none"
    for n in (1, 5, 37):  # a dynamic batch dimension: not the example's 2
        x = make_data(n, 3)[0]
        got = exported(x)
        assert got.shape == (n, 3)
        torch.testing.assert_close(got, model(x).detach(), atol=1e-5, rtol=1e-4)
    # Reloaded from its bytes alone (as from a model.onnx): the same outputs.
    assert not model.training  # the exporter restores the mode it found
    again = OnnxModel(exported.data)
    x = make_data(4, 4)[0]
    assert torch.equal(again(x), exported(x))


class TwoInputs(nn.Module):
    """Called with keyword tensors (a dict batch), returning a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, *, left: torch.Tensor, right: torch.Tensor, scale: float = 2.0) -> tuple:
        return self.a(left) * scale + self.b(right), self.b(right)


def test_keyword_inputs_and_tuple_outputs_keep_their_structure() -> None:
    model = TwoInputs().eval()
    batch = {"left": torch.randn(2, 4), "right": torch.randn(2, 2)}
    exported = export_onnx(model, batch, default_forward)
    assert [i.name for i in onnx.load_from_string(exported.data).graph.input] == ["left", "right"]
    bigger = {"left": torch.randn(7, 4), "right": torch.randn(7, 2)}
    got, want = exported(**bigger), model(**bigger)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.detach(), atol=1e-5, rtol=1e-4)


def test_sessions_follow_torch_s_thread_count(tiny_task: Task) -> None:
    exported = export_onnx(tiny_task.model, tiny_task.example(2), tiny_task.forward)
    exported(tiny_task.example(2)[0])
    assert exported.session().get_session_options().intra_op_num_threads == 1  # conftest's
    assert exported.session(2).get_session_options().intra_op_num_threads == 2


@pytest.mark.parametrize("quantization", ["int8-dynamic", "int8-static"])
def test_int8_is_smaller_close_and_deterministic(mlp: Task, quantization: str) -> None:
    fp32 = deploy(mlp.model, mlp)
    quantized = deploy(mlp.model, mlp, quantization)
    assert quantized.quantization == quantization and fp32.quantization == "none"
    # 16.7k weights: int8 stores them in a byte each, against 4 (scales and graph besides).
    assert quantized.file_bytes < fp32.file_bytes / 3
    assert int8_operators(onnx.load_from_string(quantized.data)) >= 3
    assert int8_operators(onnx.load_from_string(fp32.data)) == 0
    dense = evaluate(mlp.model, mlp, "val")[0]
    assert abs(evaluate(quantized, mlp, "val")[0] - dense) <= 2 / 96  # two samples at most
    assert deploy(mlp.model, mlp, quantization).data == quantized.data  # calibration in order


def test_a_quantization_the_model_cannot_take_is_one_line() -> None:
    torch.manual_seed(0)
    x, y = make_data(64, 0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    task = Task(model=model, train=(x, y), val=(x, y))
    with pytest.raises(DeployFailed) as info:
        deploy(model, task, "int8-dynamic")
    assert str(info.value) == (
        "int8-dynamic quantized no operator of this model (ONNX Runtime's quantizer takes "
        "MatMul/Gemm (Linear), LSTM, GRU or attention operators)"
    )
    assert deploy(model, task, "int8-static").quantization == "int8-static"  # convs: fine


class Spectrum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(self.linear(x.flatten(1))).abs()


def test_an_operator_onnx_lacks_is_one_line() -> None:
    with pytest.raises(DeployFailed) as info:
        export_onnx(Spectrum(), make_data(2, 0), default_forward)
    assert str(info.value).startswith("cannot export to ONNX: Exporting the operator ")
    assert "fft_rfft" in str(info.value) and "\n" not in str(info.value)


def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SpecError) as info:
        require_onnx()
    assert str(info.value) == (
        "deploying to ONNX needs onnxruntime: pip install 'autoprune[onnx]'"
    )
    with pytest.raises(SpecError, match="autoprune\\[onnx\\]"):
        autoprune.make_setup(
            mlp_task(),
            space=autoprune.SearchSpace(
                granularities=["structured"], quantizations=["none", "int8-static"]
            ),
            objectives=["accuracy", "bytes"],
        )


def test_measurements_of_a_deployed_model(mlp: Task) -> None:
    from autoprune import measure

    quantized = deploy(mlp.model, mlp, "int8-static")
    context = measure.Context(
        mlp.example(1), ("1", "3", "5"), measure.Latency(repeats=2), mlp.forward
    )
    values = measure.measure(quantized, ["accuracy", "bytes", "latency_ms"], context)
    assert values["bytes"] == quantized.file_bytes
    assert values["latency_ms"] > 0


class OwnLoss(nn.Module):
    """Computes its own loss when given labels, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 3)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.linear(pixels.flatten(1))
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_a_deployed_model_takes_no_targets() -> None:
    torch.manual_seed(0)
    x, y = make_data(64, 0)
    data = {"pixels": x, "labels": y}
    task = Task(model=OwnLoss(), train=data, val=data)
    deployed = deploy(task.model, task, "int8-dynamic")
    assert [i.name for i in onnx.load_from_string(deployed.data).graph.input] == ["pixels"]
    out = deployed(pixels=x[:5], labels=y[:5])  # called as in training: the labels are unused
    assert set(out) == {"logits"} and out["logits"].shape == (5, 3)
    score, loss = evaluate(deployed, task, "val")  # the task's loss, from the logits
    want_score, want_loss = evaluate(task.model, task, "val")
    assert abs(loss - want_loss) < 0.05
    # int8 moves each logit by at most `error`, so only a sample whose top two dense logits
    # are within 2 * error may change its class (an untrained model has many near-ties).
    with torch.no_grad():
        dense = task.model(pixels=x)["logits"]
    quantized = torch.as_tensor(deployed(pixels=x)["logits"])
    error = float((quantized - dense).abs().max())
    top2 = dense.topk(2, dim=1).values
    flipped = dense.argmax(1) != quantized.argmax(1)
    assert bool((top2[flipped, 0] - top2[flipped, 1] <= 2 * error).all())
    assert abs(score - want_score) <= float(flipped.float().mean()) + 1e-9
