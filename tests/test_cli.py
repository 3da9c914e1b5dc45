"""The ``autoprune`` command, run in-process: end to end on digits, and every kind of bad input."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import autoprune
import autoprune.run.worker
import autoprune.tasks
from autoprune.cli import main
from autoprune.report.data import pareto_front
from autoprune.tasks import load_task

SPEC = """\
task = "digits-cnn"
trials = 6
early_stop = false  # these tests follow the sampler's own trials, all completed

[finetune]
epochs = 1

[warm_start]  # off as well (see test_heuristics.py)
allocations = []
"""


@contextmanager
def fresh_logging() -> Iterator[None]:
    """Let ``main`` configure logging as in a fresh process (pytest's handlers set aside)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with fresh_logging():
        code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(study: optuna.Study) -> list[tuple[int, TrialState, Any, dict[str, Any]]]:
    return [(t.number, t.state, t.values, t.params) for t in study.trials]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def files_besides_sqlite_logs(directory: Path) -> list[str]:
    """Names in ``directory``, less the write-ahead log files that SQLite keeps beside a
    database while this test process still holds it open (it removes them on close)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(("-wal", "-shm")))


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two runs of ``autoprune search`` on the same spec in one directory: the spec's 6
    trials, then ``--trials 12`` (the study's total: 6 more)."""
    directory = tmp_path_factory.mktemp("cli")
    (directory / "spec.toml").write_text(SPEC, encoding="utf-8")
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(directory)
        for more in ([], ["--trials", "12"]):
            out, err = io.StringIO(), io.StringIO()  # module fixtures cannot use capsys
            with redirect_stdout(out), redirect_stderr(err), fresh_logging():
                code = main(["search", "spec.toml", "-q", *more])
            study = optuna.load_study(study_name="digits-cnn", storage="sqlite:///autoprune.db")
            trials = snapshot(study)
            runs.append(
                {"code": code, "out": out.getvalue(), "err": err.getvalue(), "trials": trials}
            )
    return {"dir": directory, "runs": runs}


def load(directory: Path, name: str = "digits-cnn", db: str = "autoprune.db") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{directory / db}")


@pytest.mark.slow
def test_search_end_to_end(searched: dict[str, Any]) -> None:
    directory = searched["dir"]
    first, second = searched["runs"]
    assert first["code"] == 0 and second["code"] == 0
    for run_ in (first, second):  # -q: no progress bar; log lines (the dense model) only
        assert "%|" not in run_["err"] and "error" not in run_["err"]
    assert [state for _, state, _, _ in first["trials"]] == [TrialState.COMPLETE] * 6
    # The second run resumes up to the total of 12: 6 more trials, the first 6 untouched.
    assert [number for number, *_ in second["trials"]] == list(range(12))
    assert second["trials"][:6] == first["trials"]
    assert all(state == TrialState.COMPLETE for _, state, _, _ in second["trials"])

    study = load(directory)
    out = second["out"]
    assert out.startswith("dense digits-cnn: val accuracy ")
    assert "38160 prunable weights" in out
    assert "study 'digits-cnn': 12 trials (12 complete)" in out
    match = re.search(r"^Pareto front \((\d+) trials\):$", out, flags=re.MULTILINE)
    assert match and int(match.group(1)) == len(study.best_trials) >= 1
    assert "study 'digits-cnn' in sqlite:///autoprune.db" in out
    report = re.search(r"^report: (.+)$", out, flags=re.MULTILINE)
    assert report and Path(report.group(1)) == directory / "digits-cnn.html"
    assert Path(report.group(1)).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "front weights: autoprune.artifacts" in out
    assert files_besides_sqlite_logs(directory) == [
        "autoprune.artifacts",
        "autoprune.db",
        "digits-cnn.html",
        "spec.toml",
    ]


def assert_same_rows(read: pd.DataFrame, front: pd.DataFrame, *, exact: bool) -> None:
    assert list(read.columns) == list(front.columns)
    assert len(read) == len(front)
    for (_, a), (_, b) in zip(read.iterrows(), front.iterrows(), strict=True):
        for column in front.columns:
            x, y = a[column], b[column]
            if isinstance(y, float) and math.isnan(y):
                assert x is None or math.isnan(x), column
            elif isinstance(y, float):
                assert x == y if exact else math.isclose(x, y, rel_tol=0, abs_tol=1e-9), column
            else:
                assert x == y, column


@pytest.mark.slow
def test_front_exports(
    searched: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    directory = searched["dir"]
    monkeypatch.chdir(directory)
    front = pareto_front(load(directory))

    code, out, err = run(capsys, "front", "--csv", "f.csv")
    assert (code, err) == (0, "")
    assert out == f"wrote {len(front)} front trials to f.csv\n"
    assert_same_rows(pd.read_csv("f.csv"), front, exact=True)

    code, out, err = run(capsys, "front", "--json", "f.json")
    assert (code, err) == (0, "")
    assert_same_rows(pd.read_json(directory / "f.json", orient="records"), front, exact=False)

    code, out, err = run(capsys, "front")
    assert (code, err) == (0, "")
    assert out.startswith(f"Pareto front ({len(front)} trials):\n")
    assert len(out.strip().splitlines()) == 2 + len(front)

    code, out, err = run(capsys, "report", "--out", "r.html")
    assert (code, err) == (0, "")
    assert out == f"report: {directory / 'r.html'}\n"
    assert (directory / "r.html").read_text(encoding="utf-8").count("plotly-graph-div") >= 2

    for name in ("f.csv", "f.json", "r.html"):
        (directory / name).unlink()


@pytest.mark.slow
def test_storage_and_study_name_overrides(
    searched: dict[str, Any], tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.toml").write_text(SPEC, encoding="utf-8")
    code, out, err = run(
        capsys,
        "search",
        "spec.toml",
        "-q",
        "--storage",
        "sqlite:///other.db",
        "--study-name",
        "mine",
        "--trials",
        "2",
        "--report",
        "mine-report.html",
    )
    assert code == 0 and "%|" not in err and "error" not in err
    assert "study 'mine' in sqlite:///other.db" in out
    assert files_besides_sqlite_logs(tmp_path) == [
        "mine-report.html",
        "other.artifacts",
        "other.db",
        "spec.toml",
    ]
    study = load(tmp_path, "mine", "other.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert optuna.get_all_study_names("sqlite:///other.db") == ["mine"]

    code, out, err = run(
        capsys, "front", "--storage", "sqlite:///other.db", "--study-name", "mine"
    )
    assert (code, err) == (0, "")
    assert out.startswith(f"Pareto front ({len(study.best_trials)} trials):")
    # One study in the storage: its name may be left out.
    code, out, err = run(capsys, "report", "--storage", "sqlite:///other.db")
    assert (code, err) == (0, "")
    assert out == f"report: {tmp_path / 'mine.html'}\n"


USER_MODULE = """
def not_a_task():
    return "a string"
"""

GOOD_DB = "good.db"


def bad_specs() -> list[tuple[str, str, str]]:
    """(id, spec text, text the error must contain)."""
    return [
        ("criterion", SPEC + '[space]\ncriteria = ["magnitude", "l2"]\n', "'l2'"),
        ("sparsity", SPEC + "[space]\nsparsity = [0.1, 1.0]\n", "[0.1, 1.0]"),
        ("unknown-key", SPEC + "trails = 3\n", "'trails'"),
        ("toml", SPEC + "seed = \n", "malformed TOML"),
        ("trials", SPEC.replace("trials = 6", 'trials = "ten"'), "'ten'"),
        ("no-module", SPEC.replace("digits-cnn", "nosuch.module:f"), "'nosuch.module:f'"),
        (
            "not-a-task",
            SPEC.replace("digits-cnn", "autoprune_cli_user:not_a_task"),
            "'autoprune_cli_user:not_a_task' returned str",
        ),
        ("globs", SPEC + '[space]\ninclude = ["nomatch*"]\n', "['nomatch*']"),
        ("dialect", 'storage = "nosuchdialect://x"\n' + SPEC, "'nosuchdialect://x'"),
        (
            "no-dir",
            'storage = "sqlite:///no/such/dir/x.db"\n' + SPEC,
            "'sqlite:///no/such/dir/x.db'",
        ),
    ]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "autoprune_cli_user.py").write_text(USER_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_task("digits-cnn")  # trained once per session, so that no run logs its training
    # An existing study that no failed command may change.
    optuna.create_study(storage=f"sqlite:///{tmp_path / GOOD_DB}", study_name="kept")
    yield tmp_path
    sys.modules.pop("autoprune_cli_user", None)


def assert_one_line_error(code: int, out: str, err: str, names: str) -> None:
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("autoprune: error: ")
    assert names in err
    assert "Pareto front" not in out


@pytest.mark.parametrize(
    ("text", "names"), [b[1:] for b in bad_specs()], ids=[b[0] for b in bad_specs()]
)
def test_bad_spec(workdir: Path, capsys, text: str, names: str) -> None:
    (workdir / "spec.toml").write_text(text, encoding="utf-8")
    before = files(workdir)
    code, out, err = run(capsys, "search", "spec.toml")
    assert_one_line_error(code, out, err, names)
    assert files(workdir) == before  # no database created or changed, no report


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["search", "spec.toml", "--timeout", "soon"], "'soon'"),
        (["search", "nope.toml"], "'nope.toml'"),
        (["front", "--storage", f"sqlite:///{GOOD_DB}", "--study-name", "nope"], "'nope'"),
        (["report", "--storage", f"sqlite:///{GOOD_DB}", "--study-name", "nope"], "'nope'"),
        (["front", "--storage", "sqlite:///missing.db", "--study-name", "nope"], "missing.db"),
        (["front", "--storage", "sqlite:///missing.db"], "missing.db"),
        (["report", "--storage", "sqlite:///missing.db"], "missing.db"),
        (["front", "--storage", "nosuchdialect://x"], "'nosuchdialect://x'"),
        (["front", "--storage", f"sqlite:///{GOOD_DB}", "--csv", "a", "--json", "b"], "--csv"),
    ],
    ids=[
        "timeout",
        "no-spec",
        "front-no-study",
        "report-no-study",
        "front-no-db",
        "front-no-db-no-name",
        "report-no-db",
        "front-dialect",
        "csv-and-json",
    ],
)
def test_bad_arguments(workdir: Path, capsys, argv: list[str], names: str) -> None:
    (workdir / "spec.toml").write_text(SPEC, encoding="utf-8")
    before = files(workdir)
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, names)
    assert files(workdir) == before


def test_front_of_a_study_not_made_by_autoprune(workdir: Path, capsys) -> None:
    before = files(workdir)
    code, out, err = run(capsys, "front", "--storage", f"sqlite:///{GOOD_DB}")
    assert_one_line_error(code, out, err, "'kept' was not made by autoprune")
    assert files(workdir) == before


@pytest.mark.slow
def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("autoprune")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: autoprune")
    for command in ("search", "front", "report"):
        assert command in result.stdout


RESNET_SPEC = """\
task = "digits-resnet"
trials = 2
objectives = ["accuracy", "macs"]

[space]
granularities = ["structured"]
channel_criteria = ["bn_scale", "l1"]
channel_sparsity = [0.3, 0.6]
blocks = ["stages.*.1"]

[finetune]
epochs = 1
"""


@pytest.mark.slow
def test_structured_search_and_export_of_digits_resnet(workdir: Path, capsys) -> None:
    """The built-in ResNet through the CLI: a MACs study, its front, report and an export
    that reloads to the recorded accuracy."""
    from autoprune.train import evaluate

    (workdir / "r.toml").write_text(RESNET_SPEC, encoding="utf-8")
    code, out, err = run(capsys, "search", "r.toml", "-q")
    assert code == 0, err
    assert "dense digits-resnet: val accuracy" in out and " macs " in out.replace("\n", " ")
    study = optuna.load_study(study_name="digits-resnet", storage="sqlite:///autoprune.db")
    assert study.metric_names == ["accuracy", "macs"]
    trial = study.best_trials[0]
    code, out, err = run(capsys, "export", str(trial.number), "--out", "m")
    assert code == 0, err
    assert f"exported trial {trial.number}" in out
    model = autoprune.load(workdir / "m")
    task = load_task("digits-resnet")
    assert evaluate(model, task, "val")[0] == trial.values[0]
    dense = sum(p.numel() for p in task.model.parameters())
    assert sum(p.numel() for p in model.parameters()) < dense
    assert "plan" in json.loads((workdir / "m" / "export.json").read_text(encoding="utf-8"))
    code, out, err = run(capsys, "export", "99", "--out", "m99")
    assert code == 2 and "has no trial 99" in err


def no_work(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the work started before the output path was checked")


@pytest.mark.parametrize(
    ("argv", "path", "why"),
    [
        (["search", "spec.toml", "--report", "nodir/r.html"], "nodir/r.html", "does not exist"),
        (["search", "spec.toml", "--report", "adir"], "adir", "it is a directory"),
        (["search", "spec.toml", "--report", "ro/r.html"], "ro/r.html", "not writable"),
        (["search", "spec.toml", "--report", "x" * 300], "x" * 300, "File name too long"),
        (
            ["front", "--storage", f"sqlite:///{GOOD_DB}", "--csv", "afile/f.csv"],
            "afile/f.csv",
            "'afile' is not a directory",
        ),  # fmt: skip
        (["front", "--storage", f"sqlite:///{GOOD_DB}", "--json", "adir"], "adir", "a directory"),
        (
            ["report", "--storage", f"sqlite:///{GOOD_DB}", "--out", "ro/r.html"],
            "ro/r.html",
            "not writable",
        ),  # fmt: skip
        (
            ["prune", "spec.toml", "--policy", "uniform", "--sparsity", "0.5", "--out", "nodir/m"],
            "nodir/m",
            "does not exist",
        ),  # fmt: skip
        (
            ["export", "0", "--storage", f"sqlite:///{GOOD_DB}", "--out", "afile/sub"],
            "afile/sub",
            "'afile' is not a directory",
        ),  # fmt: skip
        (
            ["export", "0", "--storage", f"sqlite:///{GOOD_DB}", "--out", "ro/sub"],
            "ro/sub",
            "not writable",
        ),  # fmt: skip
    ],
    ids=[
        "search-no-dir",
        "search-a-dir",
        "search-read-only",
        "search-too-long",
        "front-csv",
        "front-json",
        "report",
        "prune",
        "export-under-a-file",
        "export-read-only",
    ],
)
def test_bad_output_path_fails_before_the_work(
    workdir: Path, capsys, monkeypatch: pytest.MonkeyPatch, argv: list[str], path: str, why: str
) -> None:
    (workdir / "spec.toml").write_text(SPEC, encoding="utf-8")
    (workdir / "afile").write_text("", encoding="utf-8")
    (workdir / "adir").mkdir()
    (workdir / "ro").mkdir()
    real = os.access  # chmod does not stop root, who runs CI: os.access says read-only
    monkeypatch.setattr(os, "access", lambda p, m, **kw: Path(p) != Path("ro") and real(p, m))
    # The commands import what does the work when they run: replace it where it is defined.
    monkeypatch.setattr(autoprune.tasks, "load_task", no_work)  # a spec's task is built there
    before = files(workdir)
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, f"cannot write {path!r}: ")
    assert why in err
    assert files(workdir) == before and not (workdir / "autoprune.db").exists()


@pytest.mark.parametrize(
    ("name", "file"),
    [("../escaped", "_escaped.html"), ("n" * 300, "n" * 146 + "-"), ("a\nb", "a_b.html")],
)
def test_search_report_named_after_the_study_stays_here(
    workdir: Path, capsys, monkeypatch: pytest.MonkeyPatch, name: str, file: str
) -> None:
    (workdir / "spec.toml").write_text(SPEC, encoding="utf-8")
    monkeypatch.setattr(
        autoprune.run.worker, "run_worker", lambda *args, **kwargs: "no trials run"
    )
    code, out, err = run(capsys, "search", "spec.toml", "-q", "--study-name", name)
    assert code == 0, err
    page = [p.name for p in workdir.iterdir() if p.suffix == ".html"]
    assert len(page) == 1 and page[0].startswith(file) and f"report: {workdir / page[0]}" in out
    assert not (workdir.parent / "escaped.html").exists()


READING = [["status"], ["front"], ["pick", "--knee"], ["report", "--out", "r.html"]]


@pytest.mark.parametrize("argv", READING, ids=lambda argv: argv[0])
def test_reading_commands_read_whole_only_the_trials_they_show(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    """Counts and fronts come from every trial's state and values; whole records (policy,
    loss curves) are read only of the trials shown: none for status, the front for front and
    pick, the front and the dominated points shown for report."""
    from test_dashboard import hand_made

    from autoprune.study import _optuna

    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    study = hand_made("a", storage)
    front = {t.number for t in study.best_trials}
    reads: list[tuple[set[int] | None, object]] = []
    real = _optuna.read_trials

    def read_trials(*args: Any, **kwargs: Any) -> list[optuna.trial.FrozenTrial]:
        numbers = kwargs.get("numbers")
        reads.append((None if numbers is None else set(numbers), kwargs.get("user_attrs")))
        return real(*args, **kwargs)

    monkeypatch.setattr(_optuna, "read_trials", read_trials)
    monkeypatch.setattr(optuna.Study, "get_trials", None)  # never Optuna's whole read
    code, _, err = run(capsys, *argv, "--storage", storage)
    assert code == 0, err
    whole = [numbers for numbers, attrs in reads if attrs is None]
    assert all(numbers is not None for numbers in whole)
    if argv[0] == "status":
        assert whole == []
    elif argv[0] in ("front", "pick"):
        assert whole == [front]
    else:
        assert len(whole) == 1 and front <= whole[0]
    summaries = [attrs for numbers, attrs in reads if attrs is not None]
    small = {"density", "policy", "worker", "surplus", "resumes", "fidelity", "promoted_from"}
    assert summaries and all(set(attrs) <= small for attrs in summaries)


def test_reading_commands_never_import_torch(tmp_path: Path) -> None:
    """status, front, pick and report start without torch (seconds of import)."""
    from test_dashboard import hand_made

    storage = f"sqlite:///{tmp_path / 'x.db'}"
    hand_made("a", storage)
    script = (
        "import sys\n"
        "from autoprune.cli import main\n"
        f"for argv in {READING!r}:\n"
        f"    assert main([*argv, '--storage', {storage!r}]) == 0, argv\n"
        "print(sorted(m for m in ('torch', 'autoprune.task', 'autoprune.measure') "
        "if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """``autoprune front | head -1``: the pipe breaks while front prints; it ends with 141,
    as a command killed by SIGPIPE, and no traceback."""
    from test_dashboard import hand_made

    storage = f"sqlite:///{tmp_path / 'x.db'}"
    hand_made("a", storage)
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the command prints
    with os.fdopen(write, "wb") as stdout:
        done = subprocess.run(
            [sys.executable, "-m", "autoprune", "status", "--storage", storage],
            cwd=tmp_path,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
        )
    assert (done.returncode, done.stderr) == (141, "")
