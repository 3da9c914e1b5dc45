"""An export's ``export.json``: what it holds, read back with every value checked.

The file comes from a directory people share, so reading it is bounded (a few MB, a seed in
range, a task reference that names a function and nothing else, channel indices in order) and
every failure is one line naming the first bad key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from autoprune.deploy import example
from autoprune.errors import StorageError
from autoprune.pruning.policy import QUANTIZATIONS, RUNTIMES

# export.json is read whole; a real one is a few kB (a plan lists channel indices).
_MAX_MANIFEST_BYTES = 16 * 2**20
_MAX_SEED = 2**32 - 1
_MAX_TASK_REF = 256
# The example input a structured export's plan is traced on: one sample.
_MAX_INPUT_ELEMENTS = 2**24
_MAX_INPUT_DIMS = 8


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """``directory``'s ``export.json``, checked: ``task`` a non-empty string, ``seed`` an
    integer in [0, 2**32), and for a structured export ``plan`` (channel indices per layer,
    removed blocks) with ``input_shape`` (a list of a few positive integers).

    Raises:
        StorageError: One line naming the file and its first bad key.
    """
    path = Path(directory) / "export.json"
    try:
        if not path.is_file():  # not a device or FIFO that would never end
            raise OSError("no export.json" if not path.exists() else "not a regular file")
        with path.open("rb") as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
        if len(raw) > _MAX_MANIFEST_BYTES:
            raise ValueError(f"export.json is larger than {_MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StorageError(f"{str(directory)!r} is not an autoprune export: {first}") from None
    try:
        check_manifest(manifest)
    except ValueError as e:
        raise StorageError(f"{str(path)!r} is not a valid export manifest: {e}") from None
    return manifest  # type: ignore[no-any-return]


def check_manifest(manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise ValueError(f"it holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format", 1) != 1 or type(manifest.get("format", 1)) is not int:
        raise ValueError(f"'format' must be 1, got {short(manifest['format'])}")
    task = manifest.get("task")
    if not isinstance(task, str) or not task or len(task) > _MAX_TASK_REF:
        raise ValueError(f"'task' must be a non-empty string, got {short(task)}")
    module, colon, function = task.partition(":")
    if colon and not (
        all(part.isidentifier() for part in module.split(".")) and function.isidentifier()
    ):
        raise ValueError(f"'task' must be a name or package.module:function, got {short(task)}")
    seed = manifest.get("seed")
    if type(seed) is not int or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"'seed' must be an integer in [0, {_MAX_SEED}], got {short(seed)}")
    runtime = manifest.get("runtime", "pytorch")
    if runtime not in RUNTIMES:
        raise ValueError(f"'runtime' must be one of {', '.join(RUNTIMES)}, got {short(runtime)}")
    if manifest.get("quantization", "none") not in QUANTIZATIONS:
        raise ValueError(f"'quantization' must be one of {', '.join(QUANTIZATIONS)}")
    if "plan" not in manifest:
        return
    plan = manifest["plan"]
    if not isinstance(plan, dict) or not set(plan) <= {"channels", "removed_blocks"}:
        raise ValueError(f"'plan' must be an object of channels and removed_blocks: {short(plan)}")
    channels = plan.get("channels")
    if not isinstance(channels, dict):
        raise ValueError(f"'plan.channels' must be an object, got {short(channels)}")
    for layer, idxs in channels.items():
        if not (
            isinstance(idxs, list)
            and all(type(i) is int and i >= 0 for i in idxs)
            and idxs == sorted(set(idxs))
        ):
            raise ValueError(
                f"'plan.channels' of {layer!r} must be increasing integers >= 0: {short(idxs)}"
            )
    blocks = plan.get("removed_blocks", [])
    if not isinstance(blocks, list) or not all(isinstance(b, str) and b for b in blocks):
        raise ValueError(f"'plan.removed_blocks' must be a list of names, got {short(blocks)}")
    if "example" in manifest:
        example.check(manifest["example"])
        return
    shape = manifest.get("input_shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= _MAX_INPUT_DIMS
        or not all(type(d) is int and d >= 1 for d in shape)
        or math.prod(shape) > _MAX_INPUT_ELEMENTS
    ):
        raise ValueError(
            f"'input_shape' must be a list of 1 to {_MAX_INPUT_DIMS} integers >= 1 with at most "
            f"{_MAX_INPUT_ELEMENTS} elements in all, got {short(shape)}"
        )


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
