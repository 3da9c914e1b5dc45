"""The study's setup: one typed record of what a study searches and how it is run.

:func:`make_setup` builds it, from a study spec (:meth:`autoprune.spec.StudySpec.setup`) or
from :func:`autoprune.search`'s arguments; :func:`autoprune.study.study.open_study` stores it
with the study (the ``autoprune`` user attr) and every consumer reads it back with
:func:`read_setup`: the trial loop, workers, status, export, the report and sensitivity.

Its fields are of two kinds. ``IDENTITY`` fields say what the trials' numbers mean (task,
dense weights, fine-tune recipe, layers, space, objectives, seed): a run that resumes the
study, or a worker that joins it, must bring the same, or it is refused. The others say how
the study is run (budget, sampler, warm starts, constraints, early stop, artifacts): the
latest ``autoprune search`` of a study stores its own, and workers follow them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from torch import nn

from autoprune import devices, measure
from autoprune._version import __version__
from autoprune.errors import SpecError, StorageError, TaskError
from autoprune.inference import as_runtime, require_onnx
from autoprune.measure import DEFAULT_OBJECTIVES, Latency
from autoprune.pruning import structured
from autoprune.pruning.criteria import get_criterion
from autoprune.pruning.masks import prunable_layers
from autoprune.study.artifacts import ArtifactSpec
from autoprune.study.constraints import Constraints
from autoprune.study.fidelity import Fidelity
from autoprune.study.record import FORMAT, STUDY_ATTR, recorded
from autoprune.study.samplers import SAMPLERS
from autoprune.study.space import SearchSpace
from autoprune.study.stopping import EarlyStop
from autoprune.study.warm_start import DEFAULT_WARM_START, WarmStart
from autoprune.task import Task
from autoprune.tasks import load_task

logger = logging.getLogger(__name__)

# Study user attr of studies made before the setup held the task reference.
_LEGACY_TASK_REF_ATTR = "autoprune_task_ref"
# What a study is searched with when its creator says nothing: the spec's defaults too.
DEFAULT_SAMPLER = "tpe"
DEFAULT_TRIALS = 40
# Bounds of a study's target and seed. Seeds derive from the seed: the sampler's is the seed
# plus the trials already run (numpy needs it below 2**32), each trial's is
# seed * 1_000_003 + its number (torch needs it below 2**64).
MAX_TRIALS = 10**7
MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The fine-tuning recipe every trial of a study follows (the task's, after overrides).

    ``precision`` is part of it: bf16 or fp16 fine-tuning gives other numbers than fp32, so
    every worker of a study must use the study's. (The device is not: it is where a worker
    runs, see :attr:`autoprune.Task.device`.) Studies stored before it existed ran in fp32,
    for whole epochs, one batch a step, on whole validation splits.
    """

    epochs: int
    lr: float
    batch_size: int
    calibration_batches: int
    precision: str = "fp32"
    steps: int | None = None
    grad_accumulation: int = 1
    val_batches: int | None = None

    @classmethod
    def of(cls, task: Task) -> Recipe:
        return cls(
            task.finetune_epochs,
            task.lr,
            task.batch_size,
            task.calibration_batches,
            task.precision,
            task.finetune_steps,
            task.grad_accumulation,
            task.val_batches,
        )

    def apply(self, task: Task) -> Task:
        """``task`` fine-tuned by this recipe (a new Task; the model is shared)."""
        return dataclasses.replace(
            task,
            finetune_epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            calibration_batches=self.calibration_batches,
            precision=self.precision,
            finetune_steps=self.steps,
            grad_accumulation=self.grad_accumulation,
            val_batches=self.val_batches,
        )


@dataclasses.dataclass(frozen=True)
class StudySetup:
    """What a study searches and how it is run; stored with the study (see the module doc).

    Build it with :func:`make_setup`, never by hand: it measures the task's layers, channel
    groups and fingerprint.

    Args:
        task: The task's name, as the study records it.
        model: A hash of the dense model's weights (:func:`model_fingerprint`).
        finetune: The fine-tuning recipe of every trial.
        layers: The prunable layers the space's globs leave.
        space: The search space.
        objectives: ``"accuracy"``, then one or two size objectives.
        latency: How ``latency_ms`` is measured; None when it is not an objective.
        seed: The study's seed (sampler and each trial's fine-tuning).
        groups: Channel groups of a structured space (names), else empty.
        blocks: Removable residual blocks of a structured space, else empty.
        higher_is_better: The direction of the task's score (the accuracy objective).
        task_ref: How to rebuild the task elsewhere (a built-in name or
            ``package.module:function``); None: the task was given as an object, so workers
            in other processes cannot join.
        trials: The study's target number of trials; None: until a timeout.
        sampler: A name in :data:`autoprune.study.samplers.SAMPLERS`; None: the run passed a
            sampler object (workers use ``DEFAULT_SAMPLER``).
        warm_start: Heuristics a new study tries first; None: none.
        constraints: Bounds on accuracy and size; None: none.
        early_stop: When hopeless trials stop; None: never.
        artifacts: Where the front trials' weights are kept.
        front_table: Keep the ``autoprune_front`` table of a database storage current.
        version: The autoprune version of the latest run.
        dense: The dense model's numbers, measured when the study was created.
        fidelity: Screen sampled policies with a short fine-tune and promote the best to the
            full one (:mod:`autoprune.study.fidelity`); the target then counts fine-tune
            compute in full trials. None: every trial is full (stored setups omit it).
    """

    task: str
    model: str
    finetune: Recipe
    layers: tuple[str, ...]
    space: SearchSpace
    objectives: tuple[str, ...]
    latency: Latency | None
    seed: int
    groups: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    higher_is_better: bool = True
    task_ref: str | None = None
    trials: int | None = DEFAULT_TRIALS
    sampler: str | None = DEFAULT_SAMPLER
    warm_start: WarmStart | None = DEFAULT_WARM_START
    constraints: Constraints | None = None
    early_stop: EarlyStop | None = None
    artifacts: ArtifactSpec = dataclasses.field(default_factory=ArtifactSpec)
    front_table: bool = True
    version: str = __version__
    dense: Mapping[str, float] = dataclasses.field(default_factory=dict)
    fidelity: Fidelity | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: ``StudySetup.from_dict(setup.to_dict()) == setup``."""
        data: dict[str, Any] = {"format": FORMAT}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _OMITTED_IF_NONE and value is None:
                continue  # setups stored before the field existed read and compare the same
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, Recipe):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            data[field.name] = value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudySetup:
        """Read what :meth:`to_dict` wrote, or the untyped setup of autoprune 0.1 studies.

        Raises:
            StorageError: If ``data`` is not a setup this version can read.
        """
        try:
            if data.get("format") != FORMAT:
                return _from_legacy(data)
            known = {f.name for f in dataclasses.fields(cls)} | {"format"}
            unknown = sorted(set(data) - known)
            if unknown:
                raise SpecError(f"unknown setup key {unknown[0]!r}")
            return cls(
                **{k: v for k, v in data.items() if k not in _TYPED and k != "format"},
                **{k: read(data[k]) for k, read in _TYPED.items() if k in data},
            )
        except (SpecError, TypeError, KeyError, ValueError) as e:
            raise StorageError(
                f"the study's setup cannot be read by autoprune {__version__}: {e}"
            ) from None

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run or a joining worker must bring unchanged."""
        data = self.to_dict()
        return {key: data.get(key) for key in IDENTITY}

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`make_setup` that rebuild this setup for a task."""
        names = (
            *("trials", "seed", "sampler", "space", "warm_start", "constraints"),
            *("early_stop", "artifacts", "objectives", "latency", "front_table", "task_ref"),
            "fidelity",
        )
        return {name: getattr(self, name) for name in names}


IDENTITY = (
    "task",
    "model",
    "finetune",
    "layers",
    "space",
    "objectives",
    "latency",
    "seed",
    "groups",
    "blocks",
    "higher_is_better",
    "fidelity",  # a screened trial's numbers are of a short fine-tune
)
# Fields added after setups were first stored: left out of ``to_dict`` at None.
_OMITTED_IF_NONE = ("fidelity",)


def _optional(read: Any) -> Any:
    return lambda value: None if value is None else read(value)


_TYPED: dict[str, Any] = {
    "finetune": lambda d: Recipe(**d),
    "layers": tuple,
    "space": SearchSpace.from_stored,
    "objectives": tuple,
    "latency": _optional(Latency.from_dict),
    "groups": tuple,
    "blocks": tuple,
    "warm_start": _optional(WarmStart.from_dict),
    "constraints": _optional(Constraints.from_dict),
    "early_stop": _optional(EarlyStop.from_dict),
    "artifacts": ArtifactSpec.from_dict,
    "dense": dict,
    "fidelity": _optional(Fidelity.from_dict),
}


def make_setup(
    task: Task,
    *,
    task_ref: str | None = None,
    trials: int | None = DEFAULT_TRIALS,
    seed: int = 0,
    sampler: str | None = DEFAULT_SAMPLER,
    space: SearchSpace | None = None,
    warm_start: WarmStart | None = DEFAULT_WARM_START,
    constraints: Constraints | None = None,
    early_stop: EarlyStop | None = None,
    artifacts: ArtifactSpec | None = None,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    latency: Latency | None = None,
    front_table: bool = True,
    fidelity: Fidelity | None = None,
) -> StudySetup:
    """The setup of a study of ``task``: the one place where one is made.

    Everything about the task is checked here, before any storage is touched, so bad input
    leaves no half-written study behind. The arguments are :func:`autoprune.search`'s (see
    there, and a study spec's: a test holds them equal); ``space=None`` is ``SearchSpace()``
    and ``warm_start=None`` is no warm start.

    Raises:
        SpecError: On bad objectives, trials, seed or sampler, unstructured pruning with
            an objective blind to it, quantization with an objective blind to it (or without
            onnx and onnxruntime installed), or an early-stop margin of 1 or more on accuracy.
        TaskError: If the space's globs leave no prunable layer (or channel group), the
            data does not fit the model, or the task's device is not available here.
    """
    for name, value, kind in (
        ("space", space, SearchSpace),
        ("warm_start", warm_start, WarmStart),
        ("constraints", constraints, Constraints),
        ("early_stop", early_stop, EarlyStop),
        ("artifacts", artifacts, ArtifactSpec),
        ("latency", latency, Latency),
        ("fidelity", fidelity, Fidelity),
    ):
        if value is not None and not isinstance(value, kind):
            raise SpecError(f"{name} must be a {kind.__name__} or None, got {value!r}")
    space = space if space is not None else SearchSpace()
    objectives = tuple(measure.check_objectives(objectives))
    measure.check_granularities(objectives, space.granularities)
    measure.check_quantizations(objectives, space.quantizations, space.granularities)
    if as_runtime(space.quantizations) == "onnxruntime":
        require_onnx()  # the onnx extra: refused before any work, not in every trial
    if trials is not None and not _int_in(trials, 1, MAX_TRIALS):
        raise SpecError(f"trials must be an integer in [1, {MAX_TRIALS}] or None, got {trials!r}")
    check_seed(seed)
    if sampler is not None and sampler not in SAMPLERS:
        raise SpecError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    if constraints is not None and not any(constraints.to_dict().values()):
        constraints = None  # no bound: the same study as no constraints
    if early_stop is not None and early_stop.margin is None:
        early_stop = None
    if early_stop is not None:
        early_stop.check_scale(task)
    layers = tuple(prunable_layers(task.model, space.include, space.exclude))
    devices.resolve_device(task.device)  # a device this machine lacks: refused before any work
    task.check()
    groups, blocks = structured_setup(task, space)
    return StudySetup(
        task=task.name,
        model=model_fingerprint(task.model),
        finetune=Recipe.of(task),
        layers=layers,
        space=space,
        objectives=objectives,
        latency=(latency or Latency()) if "latency_ms" in objectives else None,
        seed=seed,
        groups=groups,
        blocks=blocks,
        higher_is_better=task.higher_is_better,
        task_ref=task_ref,
        trials=trials,
        sampler=sampler,
        warm_start=warm_start,
        constraints=constraints,
        early_stop=early_stop,
        artifacts=artifacts or ArtifactSpec(),
        front_table=front_table,
        fidelity=fidelity,
    )


def check_seed(seed: Any) -> None:
    """Raise SpecError unless ``seed`` is an integer in [0, ``MAX_SEED``]."""
    if not _int_in(seed, 0, MAX_SEED):
        raise SpecError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def structured_setup(task: Task, space: SearchSpace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The channel groups and removable blocks a structured study searches (none otherwise).

    Raises:
        TaskError: If no channel group is left by the globs, a block cannot be removed, or a
            BatchNorm criterion meets a group without BatchNorm.
    """
    if "structured" not in space.granularities:
        return (), ()
    example = task.example(2)
    groups = structured.channel_groups(
        task.model, example, space.include, space.exclude, forward=task.forward
    )
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
    blocks = structured.removable_blocks(task.model, example, space.blocks, forward=task.forward)
    if space.blocks and not blocks:
        raise TaskError(f"blocks {list(space.blocks)} match no module with parameters")
    return tuple(g.name for g in groups), tuple(blocks)


def check_same(stored: StudySetup, setup: StudySetup, name: str | None) -> None:
    """Check that study ``name``, made with ``stored``, can be run with ``setup``.

    Raises:
        StorageError: Naming the first field that differs, and what to do.
    """
    before, now = stored.identity(), setup.identity()
    for key in IDENTITY:
        if before[key] != now[key]:
            label = "dense model weights (fingerprint)" if key == "model" else key
            hint = (
                "resume with the model the study was made with, or use another study name"
                if key == "model"
                else "use another study name to search a different setup"
            )
            raise StorageError(
                f"study {name!r} was created with {label} {before[key]!r}, not "
                f"{now[key]!r}; {hint}"
            )


def read_setup(study: optuna.Study) -> StudySetup:
    """The setup stored with ``study``.

    Raises:
        StorageError: If the study was not made by autoprune, or by a version whose setup
            this one cannot read.
    """
    stored = recorded(study)
    if stored is None:
        raise StorageError(f"study {study.study_name!r} was not made by autoprune")
    if stored.get("format") != FORMAT and _LEGACY_TASK_REF_ATTR in study.user_attrs:
        stored = {**stored, "task_ref": study.user_attrs[_LEGACY_TASK_REF_ATTR]}
    return StudySetup.from_dict(stored)


def setup_if_any(study: optuna.Study) -> StudySetup | None:
    """The setup of an autoprune study; None for a study that holds none (hand-made).

    Raises:
        StorageError: If the study holds a setup this version cannot read.
    """
    return read_setup(study) if STUDY_ATTR in study.user_attrs else None


def study_task(setup: StudySetup, task_ref: str | None = None) -> Task:
    """The task a study searched, rebuilt from its reference with the study's recipe.

    Raises:
        TaskError: If the reference (``task_ref``, else the setup's, else the task's name,
            which is right for built-in tasks) does not build a task.
    """
    ref = task_ref or setup.task_ref or setup.task
    return setup.finetune.apply(load_task(ref, seed=setup.seed))


def write_setup(study: optuna.Study, setup: StudySetup) -> None:
    """Store ``setup`` with ``study`` (one storage write; none if it is already there)."""
    data = setup.to_dict()
    if study.user_attrs.get(STUDY_ATTR) != data:
        study.set_user_attr(STUDY_ATTR, data)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's state dict: the same trained weights give the same hash."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _from_legacy(data: Mapping[str, Any]) -> StudySetup:
    """The setup of a study made by autoprune 0.1 (an untyped dict, the run's spec beside it).

    Such studies resume: what they stored is read as it was written, and what they did not
    store takes the value those versions used.
    """
    spec = data.get("spec") or {}
    early = spec.get("early_stop")
    return StudySetup(
        task=data["task"],
        model=data["model"],
        finetune=Recipe(**data["finetune"]),
        layers=tuple(data["layers"]),
        space=SearchSpace.from_stored(data["space"]),
        objectives=tuple(data.get("objectives", DEFAULT_OBJECTIVES)),
        latency=Latency.from_dict(data["latency"]) if data.get("latency") else None,
        seed=data["seed"],
        groups=tuple(data.get("groups", ())),
        blocks=tuple(data.get("blocks", ())),
        task_ref=data.get("task_ref", spec.get("task")),
        trials=spec.get("trials"),
        sampler=spec.get("sampler", DEFAULT_SAMPLER),
        warm_start=WarmStart.from_dict(spec["warm_start"]) if "warm_start" in spec else None,
        constraints=Constraints.from_dict(spec.get("constraints", {})),
        early_stop=EarlyStop.from_dict(early) if early and early.get("margin") else None,
        artifacts=ArtifactSpec.from_dict(spec.get("artifacts", {})),
        version=data.get("version", "0.1.0"),
        dense=dict(data.get("dense", {})),
    )
