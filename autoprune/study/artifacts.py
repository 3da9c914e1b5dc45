"""Front-trial weights kept as Optuna artifacts, so that exporting a model needs no retraining.

A trial uploads its pruned weights from inside the objective only when its values are not
dominated by any completed trial (dominated trials cost nothing), and :class:`FrontWeights`,
called back after each trial, removes the weights of trials that have left the front
(``keep = "front"``, the default) so that long runs do not fill the disk.

Weights are stored in autoprune's one weight format (:mod:`autoprune.pruning.codec`: sparse
tensors as a bitmask plus their nonzeros, read back with ``weights_only=True``), the same as
an export's ``model.pt``; see ``scripts/bench_artifacts.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from autoprune._registry import from_dict, to_dict
from autoprune.errors import SpecError, StorageError
from autoprune.study import _optuna
from autoprune.study.front import FrontTracker, current_front
from autoprune.study.storages import JOURNAL_PREFIX, is_journal, journal_path

if TYPE_CHECKING:  # torch is imported by what writes weights, not by what reads a study
    from torch import Tensor

    from autoprune.trial import PruneResult

logger = logging.getLogger(__name__)

# Which uploaded weights are kept: those of the current front, all, or none are uploaded.
KEEP = ("front", "all", "none")
# Study user attr recording where this study's weights are (absolute directory) and the rule.
ARTIFACTS_ATTR = "autoprune_artifacts"
# Trial user attr holding the artifact id of the trial's weights.
ARTIFACT_ID_ATTR = "artifact_id"


@dataclasses.dataclass(frozen=True)
class ArtifactSpec:
    """The ``[artifacts]`` table of a study spec.

    Args:
        dir: Directory of the artifact store. None: ``<database stem>.artifacts`` next to a
            SQLite file; any other database must name one.
        keep: ``"front"`` removes the weights of trials that leave the front, ``"all"``
            keeps every upload, ``"none"`` stores no weights (export then replays trials).
    """

    dir: str | None = None
    keep: str = "front"

    def __post_init__(self) -> None:
        if self.keep not in KEEP:
            raise SpecError(f"artifacts keep must be one of {', '.join(KEEP)}, got {self.keep!r}")
        if self.dir is not None and (not isinstance(self.dir, str) or not self.dir.strip()):
            raise SpecError(f"artifacts dir must be a non-empty string, got {self.dir!r}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactSpec:
        return from_dict(cls, data, "key")


def resolve_dir(storage: str | None, spec: ArtifactSpec) -> Path | None:
    """The artifact directory for a study in ``storage`` (a URL), or None if none is kept.

    By default the directory lies next to a SQLite or journal file. A server database
    (PostgreSQL, ...) has no "next to it": its studies keep weights only in a ``spec.dir``
    that the user names (a shared file system, for workers on many machines); without one,
    ``autoprune export`` replays the trial instead.
    """
    if spec.keep == "none":
        return None
    if spec.dir is not None:
        return Path(spec.dir).expanduser().resolve()
    database = sqlite_file(storage) or _journal_file(storage)
    if database is not None:
        return database.with_name(database.stem + ".artifacts").resolve()
    return None  # in memory, or a server database without a named directory


def sqlite_file(storage: str | None) -> Path | None:
    """The database file of a ``sqlite:///path`` URL; None for anything else."""
    if storage is None or not storage.startswith("sqlite:"):
        return None
    database = sqlalchemy.engine.make_url(storage).database
    return None if database in (None, "", ":memory:") else Path(database)


def rdb_storage(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    """The SQLAlchemy-backed storage of ``study``, or None (e.g. in memory)."""
    return _optuna.rdb_storage(study)


def storage_url(study: optuna.Study) -> str | None:
    """The database URL of ``study``'s storage, ``journal:PATH`` for a journal file; None if
    it is neither (e.g. in memory)."""
    storage = rdb_storage(study)
    if storage is not None:
        return str(storage.url)
    path = _optuna.journal_file(study)
    return None if path is None else JOURNAL_PREFIX + str(Path(path).resolve())


def _journal_file(storage: str | None) -> Path | None:
    return journal_path(storage) if storage is not None and is_journal(storage) else None


def dominated(study: optuna.Study, values: Sequence[float]) -> bool:
    """Whether a completed, feasible trial of ``study`` dominates ``values`` (equal values do
    not). Like ``study.best_trials``, trials that violate a ``set_constraint`` are ignored.

    A trial that dominates ``values`` is on the front or dominated by a front trial, which
    then dominates ``values`` too: the front (kept current, :func:`current_front`) decides.
    """
    return dominated_by(current_front(study), study.directions, values)


def dominated_by(
    front: Sequence[FrozenTrial], directions: Sequence[StudyDirection], values: Sequence[float]
) -> bool:
    """Whether a trial of ``front`` dominates ``values`` (equal values do not)."""
    signs = [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions]
    mine = [s * v for s, v in zip(signs, values, strict=True)]
    for other in front:
        theirs = [s * v for s, v in zip(signs, other.values, strict=True)]
        if all(t >= m for t, m in zip(theirs, mine, strict=True)) and theirs != mine:
            return True
    return False


class FrontWeights:
    """The artifact store of a study's front-trial weights.

    Use :meth:`upload` as the objective's result hook and the object itself as a study
    callback (it removes the weights of trials that left the front when ``keep="front"``).
    """

    def __init__(self, directory: str | Path, *, keep: str = "front"):
        ArtifactSpec(dir=str(directory), keep=keep)  # validates
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.store = FileSystemArtifactStore(self.directory)
        self.keep = keep
        self._removed: set[str] = set()
        self._tracker = FrontTracker()  # the front as this callback last saw it
        self._holders: dict[int, str] = {}  # trials seen with weights: number -> artifact id

    @classmethod
    def for_study(cls, study: optuna.Study, spec: ArtifactSpec) -> FrontWeights | None:
        """The store of ``study`` by ``spec``, recorded in the study; None if none is kept."""
        directory = resolve_dir(storage_url(study), spec)
        if directory is None:
            return None
        record = {"dir": str(directory), "keep": spec.keep}
        if study.user_attrs.get(ARTIFACTS_ATTR) != record:
            study.set_user_attr(ARTIFACTS_ATTR, record)
        return cls(directory, keep=spec.keep)

    @classmethod
    def find(cls, study: optuna.Study, directory: str | Path | None = None) -> FrontWeights | None:
        """The store holding ``study``'s weights for reading: ``directory``, else the one the
        study recorded, else ``<database stem>.artifacts`` next to its SQLite file; None if
        none of them exists."""
        candidates: list[str | Path | None] = [directory]
        if directory is None:
            database = sqlite_file(storage_url(study))
            candidates = [
                study.user_attrs.get(ARTIFACTS_ATTR, {}).get("dir"),
                None if database is None else database.with_name(database.stem + ".artifacts"),
            ]
        for candidate in candidates:
            if candidate is not None and Path(candidate).is_dir():
                return cls(candidate, keep="all")
        if directory is not None:
            raise StorageError(f"artifact directory {str(directory)!r} does not exist")
        return None

    def upload(self, trial: optuna.Trial, result: PruneResult, values: Sequence[float]) -> None:
        """Store the trial's weights if ``values`` are on the current front (objective hook)."""
        if dominated(trial.study, values):
            return
        from autoprune.pruning.codec import save_state  # torch: only where weights are made

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "weights.pt"
                save_state(result.model.state_dict(), path)
                artifact_id = upload_artifact(
                    artifact_store=self.store, file_path=str(path), study_or_trial=trial
                )
        except OSError as e:  # a full disk must not stop the search: export can replay
            logger.warning("could not store the weights of trial %d: %s", trial.number, e)
            return
        trial.set_user_attr(ARTIFACT_ID_ATTR, artifact_id)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Remove the weights of trials that are no longer on the front (study callback).

        Only trials that finished since the last call and those that were on the front then
        are looked at (every trial, the first time): a trial off the front never returns.
        """
        if self.keep != "front" or ARTIFACT_ID_ATTR not in trial.user_attrs:
            return  # a trial that uploaded nothing pushed nobody off the front
        new = self._tracker.update(study, study.get_trials(deepcopy=False))
        for other in new:
            if ARTIFACT_ID_ATTR in other.user_attrs:
                self._holders[other.number] = other.user_attrs[ARTIFACT_ID_ATTR]
        front = {t.number for t in self._tracker.front}
        for number, artifact_id in list(self._holders.items()):
            if number in front:
                continue
            if artifact_id not in self._removed:
                try:
                    self.store.remove(artifact_id)
                    logger.debug("removed the weights of trial %d (off the front)", number)
                except ArtifactNotFound:
                    pass  # removed by an earlier run or another worker
                except OSError as e:  # tried again after the next trial that reaches the front
                    logger.warning("could not remove the weights of trial %d: %s", number, e)
                    continue
                self._removed.add(artifact_id)
            del self._holders[number]

    def has(self, trial: FrozenTrial) -> bool:
        """Whether ``trial``'s weights are in the store."""
        artifact_id = trial.user_attrs.get(ARTIFACT_ID_ATTR)
        if artifact_id is None:
            return False
        try:
            self.store.open_reader(artifact_id).close()
        except ArtifactNotFound:
            return False
        return True

    def load(self, trial: FrozenTrial) -> dict[str, Tensor] | None:
        """The stored state dict of ``trial``, or None if it has none (any more)."""
        artifact_id = trial.user_attrs.get(ARTIFACT_ID_ATTR)
        if artifact_id is None:
            return None
        try:
            reader = self.store.open_reader(artifact_id)
        except ArtifactNotFound:
            return None
        from autoprune.pruning.codec import load_state  # torch: only where weights are read

        with reader:
            return load_state(reader)
