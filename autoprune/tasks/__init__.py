"""Built-in tasks, and resolution of a task reference (a built-in name or module:function)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from autoprune.errors import TaskError
from autoprune.task import Task
from autoprune.tasks.digits import digits_cnn, digits_mlp, digits_resnet
from autoprune.tasks.digits_bert import digits_bert

# package.module:function, absolute (a relative import has no package to start from).
_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")

# Built-in task factories, by the name a spec uses.
TASKS: dict[str, Callable[..., Task]] = {
    "digits-cnn": digits_cnn,
    "digits-mlp": digits_mlp,
    "digits-resnet": digits_resnet,
    # Needs the hf extra (transformers), imported only when the task is built.
    "digits-bert": digits_bert,
}


def load_task(ref: str, *, seed: int = 0) -> Task:
    """Build the task named by ``ref``: a built-in name, or ``package.module:function``.

    A built-in factory is called with ``seed``; a user function is called with no argument.

    Raises:
        TaskError: If ``ref`` is unknown, does not import, or does not return a Task.
    """
    if ref in TASKS:
        return TASKS[ref](seed=seed)
    if ":" not in ref:
        raise TaskError(
            f"unknown task {ref!r} (built-in: {', '.join(TASKS)}; or give package.module:function)"
        )
    if not _REFERENCE.match(ref):
        raise TaskError(
            f"task reference {ref!r} is not package.module:function (names of letters, digits "
            "and underscores; no relative module)"
        )
    module_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # a module may raise anything while it is imported
        raise TaskError(f"task {ref!r} does not import: {e}") from e
    try:
        task = factory()
    except Exception as e:
        raise TaskError(f"task {ref!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(task, Task):
        raise TaskError(f"task {ref!r} returned {type(task).__name__}, not an autoprune.Task")
    return task


__all__ = ["TASKS", "digits_bert", "digits_cnn", "digits_mlp", "digits_resnet", "load_task"]
