"""What a study is made with, and the check that a resumed study was made with the same.

:func:`autoprune.study.study.open_study` stores the setup (task, fine-tuning recipe, layers,
space, seed, model fingerprint, objectives; for a structured space, its channel groups and
blocks) in the study's ``autoprune`` user attr; a run that resumes the study must bring the
same setup.
"""

from __future__ import annotations

from typing import Any

from autoprune.errors import StorageError, TaskError
from autoprune.pruning import structured
from autoprune.pruning.criteria import get_criterion
from autoprune.study.objective import METRIC_NAMES
from autoprune.study.space import SearchSpace
from autoprune.task import Task

# Setup keys newer than the first studies, as those studies were made: they still resume.
_SETUP_DEFAULTS: dict[str, Any] = {"objectives": list(METRIC_NAMES)}


def structured_setup(task: Task, space: SearchSpace) -> dict[str, Any]:
    """The channel groups and removable blocks a structured study searches (none otherwise).

    Raises:
        TaskError: If no channel group is left by the globs, a block cannot be removed, or a
            BatchNorm criterion meets a group without BatchNorm.
    """
    if "structured" not in space.granularities:
        return {}
    example = structured.example_input(task.val)
    groups = structured.channel_groups(task.model, example, space.include, space.exclude)
    if not groups:
        raise TaskError(
            f"include {list(space.include)} / exclude {list(space.exclude)} leave no channel "
            "group to prune (the output layer's channels are never removed)"
        )
    for name in space.channel_criteria:
        if get_criterion(name).channel_source == "batchnorm":
            for group in groups:
                if not group.batchnorms:
                    raise TaskError(
                        f"channel criterion {name!r} needs a BatchNorm, and channel group "
                        f"{group.name!r} has none"
                    )
    blocks = structured.removable_blocks(task.model, example, space.blocks)
    if space.blocks and not blocks:
        raise TaskError(f"blocks {list(space.blocks)} match no module with parameters")
    return {"groups": [g.name for g in groups], "blocks": blocks}


def check_same_setup(
    stored: dict[str, Any] | None, setup: dict[str, Any], name: str | None
) -> None:
    """Check that study ``name``, made with the ``stored`` setup (None: not by autoprune),
    can be resumed with ``setup``; the version it was made with may differ.

    Raises:
        StorageError: If it was not made by autoprune, or with a different setup.
    """
    if stored is None:
        raise StorageError(f"study {name!r} exists but was not made by autoprune")
    stored = dict(stored)
    if "space" in stored:  # spaces stored before a key was added compare with its default
        stored["space"] = SearchSpace.from_dict(stored["space"]).to_dict()
    for key in [k for k in setup if k != "version"]:  # what a study was made with
        if stored.get(key, _SETUP_DEFAULTS.get(key)) != setup[key]:
            label = "dense model weights (fingerprint)" if key == "model" else key
            hint = (
                "resume with the model the study was made with, or use another study name"
                if key == "model"
                else "use another study name to search a different setup"
            )
            raise StorageError(
                f"study {name!r} was created with {label} {stored.get(key)!r}, not "
                f"{setup[key]!r}; {hint}"
            )
