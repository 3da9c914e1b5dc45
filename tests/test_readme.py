"""README's "Your own model" examples run exactly as printed (on the CPU).

The code blocks of that section are read from README.md in order; a change to their number or
kind fails here first, so the section and this test move together.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Your own model"


def blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of each fenced block in the section, in order."""
    text = README.read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + len(SECTION) + 2)
    section = text[start : end if end != -1 else None]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_section_holds_the_examples_this_test_runs() -> None:
    assert [language for language, _ in blocks()] == ["python", "python", "python", "toml", "bash"]


@pytest.mark.slow
def test_plain_classifier_with_dataloaders(tmp_path: Path) -> None:
    code = blocks()[0][1]
    (tmp_path / "example.py").write_text(code)
    done = run([sys.executable, "example.py"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accuracy" in done.stdout and "sparsity" in done.stdout
    assert (tmp_path / "mine.db").is_file()


@pytest.mark.slow
def test_hugging_face_model_with_dict_batches(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    code = blocks()[1][1]
    (tmp_path / "example.py").write_text(code)
    done = run([sys.executable, "example.py"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accuracy" in done.stdout


@pytest.mark.slow
def test_overnight_gpu_run(tmp_path: Path) -> None:
    (_, module), (_, spec), (_, command) = blocks()[2:]
    (tmp_path / "overnight_task.py").write_text(module)
    (tmp_path / "overnight.toml").write_text(spec)
    line = command.split("#")[0].split()
    assert line == ["autoprune", "search", "overnight.toml", "--devices", "all"]
    cli = [sys.executable, "-m", "autoprune", *line[1:]]
    if torch.cuda.is_available():
        done = run(cli, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        refused = run(cli, tmp_path)
        assert refused.returncode != 0
        assert "devices 'all': torch sees no CUDA GPU here" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "overnight.db").exists()
        done = run(cli[:-2], tmp_path)  # the same study, on the CPU
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "overnight.db").is_file()
