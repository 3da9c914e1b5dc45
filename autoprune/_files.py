"""Files that autoprune writes: safe names derived from study names, output paths checked
before any work, and atomic writes that concurrent writers of one path cannot break.

The bottom layer (standard library only), so that every layer writes files the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import unicodedata
import uuid
from pathlib import Path

from autoprune.errors import OutputError

# File systems allow 255 bytes in a name; a derived name stays well under that, so that the
# temporary name beside it and a suffix added by hand still fit.
MAX_NAME_BYTES = 160
_RESERVED = set('/\\:*?"<>|')  # separators, and what Windows refuses in a name
_DOTS = re.compile(r"\.{2,}")


def safe_filename(name: str, suffix: str = "", *, default: str = "autoprune") -> str:
    """A single, portable file name made from ``name`` (e.g. a study name) plus ``suffix``.

    Path separators, control and format characters and the characters Windows refuses become
    ``_``; runs of dots become one dot; leading dots and spaces and trailing ones go, so the
    name is never hidden, ``.`` or ``..``; a name longer than :data:`MAX_NAME_BYTES` (UTF-8)
    is cut and ends with a hash of the whole, so that long names stay apart; an empty result
    becomes ``default``. A readable name such as ``digits-cnn`` is kept as it is.
    """
    clean = "".join("_" if _unsafe(c) else c for c in name)
    clean = _DOTS.sub(".", clean).strip(" .")
    limit = MAX_NAME_BYTES - len(suffix.encode())
    if len(clean.encode()) > limit:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        clean = _cut(clean, limit - len(digest) - 1).rstrip(" .") + "-" + digest
    return (clean or default) + suffix


def _unsafe(char: str) -> bool:
    # Cc: control characters; Cf: format ones (a right-to-left override disguises a name);
    # Cs: lone surrogates, which no file system encodes; Zl/Zp: line and paragraph breaks.
    return char in _RESERVED or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp")


def _cut(text: str, size: int) -> str:
    """``text`` cut to at most ``size`` UTF-8 bytes, never inside a character."""
    return text.encode()[: max(size, 0)].decode(errors="ignore")


def check_output_file(path: str | Path) -> Path:
    """``path`` as a Path, once it is known that a file can be written there: its directory
    exists and is writable, and it is no directory itself. Call it before the work whose
    result goes there, so that a bad path costs nothing.

    Raises:
        OutputError: If it cannot be written, naming the path and why.
    """
    text = str(path)
    path = Path(path)
    if not text or "\0" in text or text.endswith(("/", os.sep)) or path.name in ("", ".", ".."):
        raise OutputError(f"cannot write {text!r}: not a file name")
    mode = _mode(path, text)
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"cannot write {text!r}: it is a directory")
    if mode is not None and not stat.S_ISREG(mode):  # a device or a pipe: written in place
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write {text!r}: it is not writable")
        return path
    _check_directory(_target(path).parent, text)
    return path


def _target(path: Path) -> Path:
    """The file that writing ``path`` replaces: the one a symbolic link names, so that the
    link stays a link."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_output_dir(path: str | Path) -> Path:
    """``path`` as a Path, once it is known that a directory can be made there: it is an
    existing directory, or its nearest existing parent is a writable directory.

    Raises:
        OutputError: If it cannot be made, naming the path and why.
    """
    text = str(path)
    path = Path(path)
    if not text or "\0" in text:
        raise OutputError(f"cannot write {text!r}: not a directory name")
    for directory in (path, *path.parents):
        mode = _mode(directory, text)
        if mode is None:
            continue  # made by the writer
        if not stat.S_ISDIR(mode):
            raise OutputError(f"cannot write {text!r}: {str(directory)!r} is not a directory")
        _check_directory(directory, text)
        break
    return path


def _mode(path: Path, text: str) -> int | None:
    """``path``'s file mode, or None if nothing is there (a parent that is a file is checked
    by the caller, as it walks up). Any other failure, such as a name too long, is the
    answer."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise OutputError(f"cannot write {text!r}: {e.strerror or e}") from e


def _check_directory(directory: Path, text: str) -> None:
    where = str(directory)
    mode = _mode(directory, text)
    if mode is None:
        raise OutputError(f"cannot write {text!r}: directory {where!r} does not exist")
    if not stat.S_ISDIR(mode):
        raise OutputError(f"cannot write {text!r}: {where!r} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {text!r}: directory {where!r} is not writable")


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; return the path.

    The data goes to a temporary file of its own in the same directory, renamed over
    ``path`` when complete: a reader sees the old file or the whole new one, and writers of
    the same path at once never touch each other's temporary files (the last rename wins).
    The temporary file is removed if anything fails. The new file gets the permissions of
    a file opened as usual (the umask applies). A symbolic link stays one: the file it
    names is replaced. A device or a pipe (``/dev/stdout``) is written in place, never
    replaced.

    Raises:
        OutputError: If the file cannot be written, naming the path and why.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        if _is_stream(path):
            with open(path, "wb") as stream:
                stream.write(payload)
            return path
        target = _target(path)
        # A short, unique name: the target's own may be near the file system's limit.
        tmp = target.with_name(f".{_cut(target.name, 64)}.{uuid.uuid4().hex[:12]}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(tmp, flags, 0o666)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(payload)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    return path


def _is_stream(path: Path) -> bool:
    """Whether ``path`` (its link followed) is there and neither a file nor a directory."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
