"""Worker processes on one machine (``--workers``), and one worker per GPU (``--devices``).

Which GPU a worker gets is checked where it matters, in the environment each worker process
sees (``worker_tasks`` records it). On a machine without a GPU the workers still run, on the
device they are told; the parent's GPU check is what this process fakes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from test_worker import create_study, env, trials_of
from worker_tasks import GATHER, RECORD

from autoprune.cli import main
from autoprune.errors import SpecError
from autoprune.run import parallel
from autoprune.run.parallel import gpu_environment, parse_gpus, plan_workers, run_workers
from autoprune.run.worker import WORKER_ATTR

SPEC = 'task = "digits-cnn"\ntrials = 2\n'


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees 4 GPUs."""
    monkeypatch.setattr(parallel, "visible_gpus", lambda: 4)


@pytest.mark.usefixtures("gpus")
@pytest.mark.parametrize(
    ("workers", "devices", "planned"),
    [
        (None, None, (1, None)),
        (3, None, (3, None)),
        (None, "0,1,2,3", (4, [0, 1, 2, 3])),
        (None, "all", (4, [0, 1, 2, 3])),
        (2, "3, 1", (2, [3, 1])),  # in the order given
        (1, "2", (1, [2])),
    ],
)
def test_one_worker_per_gpu(workers: int | None, devices: str | None, planned: tuple) -> None:
    assert plan_workers(workers, devices) == planned


@pytest.mark.usefixtures("gpus")
@pytest.mark.parametrize(
    ("workers", "devices", "message"),
    [
        (3, "0,1,2,3", "3 workers on devices '0,1,2,3' (4 GPUs): one worker runs per GPU"),
        (5, "all", "5 workers on devices 'all' (4 GPUs)"),
        (None, "0,1,1", "devices '0,1,1' name GPU 1 twice (one worker per GPU)"),
        (None, "0,x", "devices must be 'all' or GPU indices separated by commas (0,1,2,3), got"),
        (None, "cuda:0", "devices must be 'all' or GPU indices"),
        (None, "-1", "devices must be 'all' or GPU indices"),
        (None, "0,,1", "devices must be 'all' or GPU indices"),
        (None, "", "devices must be 'all' or GPU indices"),
        (None, "1.5", "devices must be 'all' or GPU indices"),
        (None, "0,4", "devices '0,4' name GPU 4, but torch sees 4 GPU(s) here (0 to 3)"),
        (0, None, "workers must be an integer >= 1, got 0"),
    ],
)
def test_bad_devices_are_named(workers: int | None, devices: str | None, message: str) -> None:
    with pytest.raises(SpecError) as info:
        plan_workers(workers, devices)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("devices", ["all", "0", "0,1"])
def test_no_gpu_no_devices(monkeypatch: pytest.MonkeyPatch, devices: str) -> None:
    monkeypatch.setattr(parallel, "visible_gpus", lambda: 0)
    with pytest.raises(SpecError) as info:
        parse_gpus(devices)
    assert str(info.value) == f"devices {devices!r}: torch sees no CUDA GPU here"


def test_visible_gpus_is_torch_s() -> None:
    expected = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert parallel.visible_gpus() == expected


@pytest.mark.parametrize(
    ("parent", "gpu", "child"),
    [
        (None, 2, "2"),  # the parent sees every GPU: torch's index is the GPU's
        ("", 0, "0"),
        ("4,6,7", 1, "6"),  # the parent sees some: the child sees the parent's second
        ("GPU-a1, GPU-b2", 1, "GPU-b2"),  # by UUID
    ],
)
def test_a_worker_s_environment_names_its_gpu_alone(
    parent: str | None, gpu: int, child: str
) -> None:
    environ = (
        {"PATH": "/bin"} if parent is None else {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": parent}
    )
    made = gpu_environment(gpu, environ)
    assert made == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": child}
    assert environ.get("CUDA_VISIBLE_DEVICES") == parent  # the parent's own is untouched


def test_the_worker_command_passes_the_device() -> None:
    command = parallel.worker_command(
        "sqlite:///x.db", "s", target=4, timeout=None, threads=2, heartbeat=10, device="cuda"
    )
    assert command[command.index("--device") + 1] == "cuda"
    without = parallel.worker_command(
        "sqlite:///x.db", "s", target=4, timeout=None, threads=2, heartbeat=10
    )
    assert "--device" not in without


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--workers", "3", "--devices", "0,1"], "3 workers on devices '0,1' (2 GPUs)"),
        (["--devices", "0,0"], "devices '0,0' name GPU 0 twice"),
        (["--devices", "a,b"], "got 'a,b'"),
        (["--devices", "9"], "name GPU 9, but torch sees 4 GPU(s)"),
        (["--device", "cuda", "--devices", "0,1"], "give --device or --devices, not both"),
        (["--device", "gpu"], "device must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"),
    ],
)
def test_bad_device_arguments_fail_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    gpus: None,
    argv: list[str],
    names: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.toml").write_text(SPEC, encoding="utf-8")
    code = main(["search", "spec.toml", "-q", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("autoprune: error: ") and err.count("\n") == 1 and names in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]  # nothing made


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize(
    "argv",
    [
        ["search", "spec.toml", "--devices", "all"],
        ["search", "spec.toml", "--device", "cuda"],
        ["search", "spec.toml", "--device", "cuda:1"],
        ["worker", "--storage", "sqlite:///nope.db", "--device", "cuda:1"],
    ],
)
def test_no_gpu_here_is_a_one_line_error_not_a_cpu_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.toml").write_text(SPEC, encoding="utf-8")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "torch sees no CUDA GPU here" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


@pytest.mark.slow
def test_each_worker_sees_exactly_its_own_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers on GPUs 0 and 1 of a parent that sees physical GPUs 3 and 1: each worker
    process sees one of them alone, a different one each, and is told its device. Both run
    trials (their first trials wait for each other)."""
    url, name = f"sqlite:///{tmp_path / 'g.db'}", "gpus"
    study = create_study(url, name, task="tiny", trials=4)
    for folder in ("gather", "seen"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])
    monkeypatch.setenv(GATHER, f"{tmp_path / 'gather'}:2")
    monkeypatch.setenv(RECORD, str(tmp_path / "seen"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    lines, codes = run_workers(
        study, url, 2, target=4, heartbeat=10, device="cpu", gpus=[0, 1], poll=0.2
    )
    assert codes == [0, 0], lines
    seen = {int(p.name): json.loads(p.read_text()) for p in (tmp_path / "seen").iterdir()}
    assert sorted(s["visible"] for s in seen.values()) == ["1", "3"]
    for s in seen.values():
        assert s["argv"][0] == "worker" and s["argv"][-2:] == ["--device", "cpu"]
    trials = trials_of(url, name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert {int(t.user_attrs[WORKER_ATTR].rpartition(":")[2]) for t in trials} == set(seen)
    assert [line[-7:] for line in lines] == ["[GPU 0]", "[GPU 1]"]  # as the parent numbers them
