"""Safe file names from study names, output paths checked before the work, atomic writes."""

from __future__ import annotations

import os
import random
import stat
import threading
from pathlib import Path

import pytest
import torch

from autoprune._files import (
    MAX_NAME_BYTES,
    atomic_write,
    check_output_dir,
    check_output_file,
    safe_filename,
)
from autoprune.errors import AutopruneError, OutputError
from autoprune.pruning.codec import load_state, save_state


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("digits-cnn", "digits-cnn.html"),
        ("my_study v2 (final)", "my_study v2 (final).html"),
        ("étude-ü", "étude-ü.html"),
        ("mypkg.tasks:build", "mypkg.tasks_build.html"),
        ("../escaped", "_escaped.html"),
        ("/var/www/index", "_var_www_index.html"),
        ("..\\..\\win", "_._win.html"),
        ("a/../../b", "a_._._b.html"),
        (".hidden", "hidden.html"),
        ("..", "autoprune.html"),
        ("", "autoprune.html"),
        (" . ", "autoprune.html"),
        ("tab\there\nnl\x00nul\x7f", "tab_here_nl_nul_.html"),
        ("evil\u202elmth.exe", "evil_lmth.exe.html"),  # a right-to-left override
        ("a\ud800b", "a_b.html"),  # a lone surrogate, which no file system can encode
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name, ".html") == expected


def test_safe_filename_is_always_one_bounded_name() -> None:
    rng = random.Random(0)
    alphabet = 'ab./\\:*?"<>| \t\n\x00\x1b\u202eé€😀\ud800'
    for _ in range(2000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 400)))
        safe = safe_filename(name, ".html")
        stem = safe.removesuffix(".html")
        assert safe.endswith(".html") and stem
        assert Path(safe).name == safe and os.sep not in safe and "\\" not in safe
        assert not safe.startswith(".") and ".." not in safe
        assert len(safe.encode()) <= MAX_NAME_BYTES  # also: every character encodes
        assert all(c.isprintable() or c == " " for c in safe), repr(safe)


def test_long_names_are_cut_and_stay_apart() -> None:
    a, b = "x" * 300 + "a", "x" * 300 + "b"
    assert safe_filename(a) != safe_filename(b)
    assert len(safe_filename("€" * 300, ".html").encode()) <= MAX_NAME_BYTES
    assert safe_filename("x" * 100) == "x" * 100  # under the bound: unchanged


def test_check_output_file_accepts_a_writable_place(tmp_path: Path) -> None:
    assert check_output_file(tmp_path / "r.html") == tmp_path / "r.html"
    (tmp_path / "old.html").write_text("old")
    assert check_output_file(str(tmp_path / "old.html")) == tmp_path / "old.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.html"]  # nothing written


def refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readonly: Path) -> None:
    """Make ``readonly`` read-only to ``os.access``: chmod does not stop root, who runs CI."""
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: Path(p) != readonly and real(p, mode, **kw)
    )


@pytest.mark.parametrize(
    ("relative", "why"),
    [
        ("nodir/r.html", "directory '{d}/nodir' does not exist"),
        ("afile/r.html", "'{d}/afile' is not a directory"),
        ("adir", "it is a directory"),
        ("adir/", "not a file name"),
        ("ro/r.html", "directory '{d}/ro' is not writable"),
        ("x" * 300, "File name too long"),
    ],
)
def test_check_output_file_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: str, why: str
) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    (tmp_path / "ro").mkdir()
    refuse(tmp_path, monkeypatch, tmp_path / "ro")
    before = sorted(tmp_path.rglob("*"))
    path = f"{tmp_path}/{relative}"
    with pytest.raises(OutputError) as error:
        check_output_file(path)
    assert str(error.value) == f"cannot write {path!r}: " + why.format(d=tmp_path)
    assert isinstance(error.value, (AutopruneError, OSError))
    assert sorted(tmp_path.rglob("*")) == before


def test_check_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "ro").mkdir()
    refuse(tmp_path, monkeypatch, tmp_path / "ro")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output_dir(tmp_path) == tmp_path
    for relative, why in [
        ("afile/sub", "'{d}/afile' is not a directory"),
        ("afile", "'{d}/afile' is not a directory"),
        ("ro/sub", "directory '{d}/ro' is not writable"),
    ]:
        with pytest.raises(OutputError, match="^cannot write .*") as error:
            check_output_dir(tmp_path / relative)
        assert str(error.value).endswith(why.format(d=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ro"]


def test_atomic_write_replaces_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "r.html"
    assert atomic_write(path, "first") == path
    atomic_write(str(path), b"second \xe2\x82\xac")
    assert path.read_text(encoding="utf-8") == "second €"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    umask = os.umask(0o022)
    os.umask(umask)
    # The permissions of an ordinary new file (not mkstemp's 0600): a report stays readable.
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_fails_in_one_line_and_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match=r"^cannot write '.*adir': Is a directory$"):
        atomic_write(tmp_path / "adir", "x")  # the rename fails, after the temporary write
    with pytest.raises(OutputError, match=r"^cannot write '.*nodir/r.html': No such file"):
        atomic_write(tmp_path / "nodir" / "r.html", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["adir"]
    assert not any((tmp_path / "adir").iterdir())


def test_atomic_write_of_a_name_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / ("n" * 255)  # the temporary name beside it must fit as well
    atomic_write(path, "x")
    assert path.read_text() == "x"


def test_atomic_write_keeps_a_link_a_link(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "r.html").write_text("old")
    link = tmp_path / "r.html"
    link.symlink_to(tmp_path / "site" / "r.html")
    assert check_output_file(link) == link
    atomic_write(link, "new")
    assert link.is_symlink() and link.read_text() == "new"
    assert [p.name for p in (tmp_path / "site").iterdir()] == ["r.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "site"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_atomic_write_writes_a_pipe_in_place(tmp_path: Path) -> None:
    """A device or a pipe (``--json /dev/stdout``) is written, not replaced by a file: the
    replace once turned /dev/full into a regular file."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_bytes()), daemon=True)
    reader.start()
    assert check_output_file(pipe) == pipe
    atomic_write(pipe, "through the pipe")
    reader.join(timeout=60)
    assert read == [b"through the pipe"]
    assert stat.S_ISFIFO(pipe.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def _write_page(path: Path, text: str) -> None:
    atomic_write(path, text)


def _write_weights(path: Path, text: str) -> None:
    save_state({"w": torch.full((64,), float(len(text)))}, path)


@pytest.mark.parametrize("writer", [_write_page, _write_weights])
def test_concurrent_writers_of_one_path(tmp_path: Path, writer) -> None:
    """Writers that start each round together (a barrier) on one path: with a shared
    temporary name one renamed the other's file away (FileNotFoundError) or mixed the two."""
    path, rounds = tmp_path / "out", 200
    texts = ["a" * 300_000, "b" * 200_000]
    barrier = threading.Barrier(len(texts), timeout=60)
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(rounds):
                barrier.wait()
                writer(path, text)
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=write, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    if writer is _write_page:
        assert path.read_text() in texts
    else:
        assert float(load_state(path)["w"][0]) in {float(len(t)) for t in texts}
