"""Opening an existing study to read it: the one way in for the commands that read studies.

Kept apart from :mod:`autoprune.study.study` (which creates and runs studies, and imports
torch) so that ``autoprune status``, ``front``, ``pick`` and ``report`` start in a fraction of
the time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import optuna

from autoprune.errors import StorageError
from autoprune.study import storages
from autoprune.study.record import STUDY_ATTR

# Seconds a process that opens a study which holds nothing yet waits for its creator (another
# process, between creating the study and storing its setup) to store the setup.
SETUP_WAIT = 30.0


def load_study(storage: str, study_name: str | None, *, wait: bool = False) -> optuna.Study:
    """Load an existing autoprune study; with one study in the storage, the name may be omitted.

    A search creates its study, then stores the setup. With ``wait``, a study that holds
    nothing yet is waited for (at most ``SETUP_WAIT`` seconds), as a process that joins the
    study needs; without it, such a study is refused at once.

    Raises:
        StorageError: If the storage cannot be opened, holds no such study, or the study was
            not made by autoprune.
    """
    if storages.missing_file(storage):  # opening it would leave an empty database behind
        raise StorageError(f"storage {storages.describe(storage)} does not exist")
    storage = storages.open_storage(storage)
    with storages.storage_errors(storage):
        names = optuna.get_all_study_names(storage)
    if study_name is None:
        if len(names) != 1:
            listed = ", ".join(names) if names else "none"
            raise StorageError(
                f"give --study-name: storage {storages.describe(storage)} holds "
                f"{len(names)} studies ({listed})"
            )
        study_name = names[0]
    if study_name not in names:
        raise StorageError(f"no study named {study_name!r} in {storages.describe(storage)}")
    study = optuna.load_study(study_name=study_name, storage=storage)
    if wait:
        await_setup(storage, study)
    if STUDY_ATTR not in study.user_attrs:
        creating = ", or a search is still creating it" if _holds_nothing(storage, study) else ""
        raise StorageError(f"study {study_name!r} was not made by autoprune{creating}")
    return study


def await_setup(
    storage: Any, study: optuna.Study, directions: Sequence[str] | None = None
) -> None:
    """Wait while ``study`` holds nothing at all: another process creates a study, then
    stores its setup, and may be between the two. A study whose directions no search
    creating it would give (``directions``, those of this process's setup, or else those of
    any autoprune study) is refused at once: it was made by hand, or for other objectives.

    Raises:
        StorageError: If nothing appears within ``SETUP_WAIT`` seconds, or at once for a
            study of other directions.
    """
    deadline = time.monotonic() + SETUP_WAIT
    if _holds_nothing(storage, study) and not _could_be_creating(storage, study, directions):
        given = ", ".join(d.name.lower() for d in study.directions)
        wanted = (
            f"this search's ({', '.join(directions)})" if directions else "an autoprune study's"
        )
        raise StorageError(
            f"study {study.study_name!r} holds nothing, and its directions ({given}) are not "
            f"{wanted}: it was made by hand, or for other objectives"
        )
    while _holds_nothing(storage, study):
        if time.monotonic() > deadline:
            raise StorageError(
                f"study {study.study_name!r} was not made by autoprune, or the search that "
                f"created it stopped before storing its setup (none came in {SETUP_WAIT:g} s)"
            )
        time.sleep(0.05)


def _could_be_creating(
    storage: Any, study: optuna.Study, directions: Sequence[str] | None
) -> bool:
    """Whether a search could be creating ``study`` now: its directions are ``directions``,
    or (None) an autoprune study's: the score's (either way), then sizes, minimised."""
    with storages.storage_errors(storage):
        given = [d.name.lower() for d in study.directions]
    if directions is not None:
        return given == list(directions)
    return len(given) >= 2 and all(d == "minimize" for d in given[1:])


def _holds_nothing(storage: Any, study: optuna.Study) -> bool:
    with storages.storage_errors(storage):
        return not study.user_attrs and not study.get_trials(deepcopy=False)
