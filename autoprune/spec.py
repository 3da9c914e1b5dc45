"""Study specs: a TOML file naming the task, storage, budget and search space of a study.

```toml
task = "digits-cnn"              # built-in name, or "package.module:function" returning a Task
study_name = "digits-cnn"        # default: the task name
storage = "sqlite:///autoprune.db"
trials = 40
timeout = "10m"                  # optional: seconds, or a number with s, m, h or d
seed = 0
objectives = ["accuracy", "nonzero_params"]  # then one or two of: nonzero_params, bytes,
                                 # macs, latency_ms (macs/latency_ms: structured only)
sampler = "tpe"                  # tpe, nsga2, gp, random or auto (see autoprune.study.samplers)
early_stop = false               # the default; true, or a table: [early_stop] margin = 0.1
device = "auto"                  # optional: where trials run, overriding the task's own: auto
                                 # (a GPU when there is one), cpu, cuda, cuda:N or mps; not part
                                 # of the study (each worker runs where it is told, --device)

[space]                          # see autoprune.SearchSpace
criteria = ["magnitude", "random", "sensitivity", "taylor", "wanda"]  # also "fisher"
scopes = ["layer", "global"]
rules = ["ratio", "mean"]
sparsity = [0.0, 0.98]
alpha = [0.25, 4.0]
include = ["*"]
exclude = []
granularities = ["unstructured"] # and/or "structured" (channels and neurons removed)
channel_criteria = ["l1", "l2", "fpgm", "taylor", "random"]  # also "bn_scale"
channel_sparsity = [0.0, 0.9]
round_to = 1
blocks = []                      # globs of residual blocks a trial may remove
parametrization = "allocation"   # or "per-layer"
schedules = ["oneshot", "gradual"]  # and/or "gradual-regrow"
allocations = ["lamp", "erk", "global", "uniform"]
quantizations = ["none"]         # and/or "int8-dynamic", "int8-static": trials deployed to
                                 # ONNX Runtime (structured; objectives bytes, latency_ms)
lr_scale = [0.5, 16.0]           # factor on the task's fine-tune learning rate (log scale);
                                 # [1, 1]: the task's own
distill = [0.0]                  # distillation weights from the dense model, e.g. [0.0, 0.5]
rewinds = [false]                # and/or true: a rewound (high, then decaying) learning rate

[latency]                        # how latency_ms is measured
batch_size = 64
threads = 1
repeats = 20
warmup = 3

[warm_start]                     # heuristics a new study tries first (see WarmStart)
allocations = ["lamp", "global"]
sparsities = [0.5, 0.8, 0.9, 0.95, 0.98]
schedules = ["oneshot", "gradual"]
extreme_allocations = ["erk", "uniform"]  # also tried at the targets from extreme_from up
extreme_from = 0.95
channel_sparsities = [0.2, 0.3, 0.5, 0.65]  # structured: uniform L1 channel pruning

[constraints]                    # optional: infeasible trials leave the front
min_accuracy = 0.9
max_density = 0.2                # or max_params = 5000

[finetune]                       # overrides the task's own recipe
epochs = 2
lr = 0.001
batch_size = 32
precision = "fp32"               # or bf16, fp16 (autocast): stored with the study's recipe
# steps = 300                    # or: a budget of optimizer steps instead of epochs
grad_accumulation = 1            # batches summed into one optimizer step
val_batches = 50                 # optional: at most this many batches per evaluation

[fidelity]                       # optional: screen sampled policies with a short fine-tune
screen = 0.25                    # fraction of the fine-tune steps of a screened trial
promote = 0.34                   # fraction of screened trials promoted to the full fine-tune
                                 # (trials then counts fine-tune compute, in full trials)

[artifacts]                      # weights of the front trials (autoprune.study.artifacts)
dir = "autoprune.artifacts"      # default: <database stem>.artifacts next to a SQLite file
keep = "front"                   # "front" (drop those that leave it), "all" or "none"
```
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoprune import devices, tasks
from autoprune._registry import check_keys
from autoprune.errors import SpecError, TaskError
from autoprune.measure import (
    DEFAULT_OBJECTIVES,
    Latency,
    check_granularities,
    check_objectives,
    check_quantizations,
)
from autoprune.study.artifacts import ArtifactSpec
from autoprune.study.constraints import Constraints
from autoprune.study.fidelity import Fidelity
from autoprune.study.samplers import SAMPLERS
from autoprune.study.setup import (
    DEFAULT_SAMPLER,
    DEFAULT_TRIALS,
    MAX_SEED,
    MAX_TRIALS,
    StudySetup,
    make_setup,
)
from autoprune.study.space import SearchSpace
from autoprune.study.stopping import EarlyStop
from autoprune.study.warm_start import DEFAULT_WARM_START, WarmStart
from autoprune.task import MAX_LR, Task

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclasses.dataclass(frozen=True)
class Finetune:
    """Fine-tuning overrides; None keeps the task's own value."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    precision: str | None = None
    steps: int | None = None
    grad_accumulation: int | None = None
    val_batches: int | None = None

    def apply(self, task: Task) -> Task:
        """``task`` with these overrides (a new Task; the model is shared, not copied)."""
        changes: dict[str, Any] = {
            "finetune_epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "precision": self.precision,
            "finetune_steps": self.steps,
            "grad_accumulation": self.grad_accumulation,
            "val_batches": self.val_batches,
        }
        return dataclasses.replace(task, **{k: v for k, v in changes.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A validated study spec; see the module docstring for the TOML form."""

    task: str = "digits-cnn"
    study_name: str | None = None
    storage: str = "sqlite:///autoprune.db"
    trials: int = DEFAULT_TRIALS
    timeout: float | None = None
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    space: SearchSpace = dataclasses.field(default_factory=SearchSpace)
    warm_start: WarmStart = DEFAULT_WARM_START
    constraints: Constraints = dataclasses.field(default_factory=Constraints)
    # Off: under a trial budget, stopped trials cost the front more than the time they save.
    early_stop: EarlyStop = dataclasses.field(default_factory=lambda: EarlyStop(margin=None))
    finetune: Finetune = dataclasses.field(default_factory=Finetune)
    artifacts: ArtifactSpec = dataclasses.field(default_factory=ArtifactSpec)
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    latency: Latency = dataclasses.field(default_factory=Latency)
    # Where this run's trials run; None: the task's own. Not part of the study's setup.
    device: str | None = None
    fidelity: Fidelity | None = None

    @property
    def name(self) -> str:
        """The study name: ``study_name``, or the task reference."""
        return self.study_name or self.task

    def load_task(self) -> Task:
        """The spec's task, built with its seed, with the ``[finetune]`` overrides and the
        ``device`` applied.

        Raises:
            TaskError: If the task reference does not build a task.
        """
        task = self.finetune.apply(tasks.load_task(self.task, seed=self.seed))
        return task if self.device is None else dataclasses.replace(task, device=self.device)

    def setup(self, task: Task) -> StudySetup:
        """The setup of this spec's study of ``task`` (built from ``self.task``, with the
        ``[finetune]`` overrides applied): the same function makes it as for
        :func:`autoprune.search`.

        Raises:
            TaskError: As :func:`autoprune.study.setup.make_setup`.
        """
        return make_setup(
            task,
            task_ref=self.task,
            trials=self.trials,
            seed=self.seed,
            sampler=self.sampler,
            space=self.space,
            warm_start=self.warm_start,
            constraints=self.constraints,
            early_stop=self.early_stop,
            artifacts=self.artifacts,
            objectives=self.objectives,
            latency=self.latency,
            fidelity=self.fidelity,
        )

    def to_dict(self) -> dict[str, Any]:
        """The spec as TOML-shaped plain data: ``spec_from_dict(spec.to_dict()) == spec``.

        Generic over the fields, so that a new key is stored with the study as it is added:
        a field with ``to_dict`` is asked for it, another dataclass becomes a table, and
        None (an unset optional key; TOML has no null) is left out.
        """
        return _plain(self)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict") and not isinstance(value, StudySpec):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {name: _plain(v) for name, v in fields if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``90``, ``"90s"``, ``"30m"``, ``"8h"`` or ``"1d"``.

    Raises:
        SpecError: If ``text`` is not such a duration, or is not positive.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise SpecError(f"timeout must be seconds or a number with s, m, h or d, got {text!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not (math.isfinite(seconds) and seconds > 0):
        raise SpecError(f"timeout must be positive, got {text!r}")
    return seconds


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a TOML study spec.

    Raises:
        SpecError: One line naming the file, and the bad key and its value.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read spec file {str(path)!r}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: malformed TOML: {e}") from None
    try:
        return spec_from_dict(data)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


# Spec tables read by a ``from_dict``; their errors are prefixed with the table's name.
_TABLES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "space": SearchSpace.from_dict,
    "warm_start": WarmStart.from_dict,
    "constraints": Constraints.from_dict,
    "artifacts": ArtifactSpec.from_dict,
    "latency": Latency.from_dict,
    "fidelity": Fidelity.from_dict,
}


def spec_from_dict(data: dict[str, Any]) -> StudySpec:
    """Validate the parsed TOML of a spec; raise SpecError naming the first bad key."""
    check_keys(data, StudySpec, "key")
    kwargs: dict[str, Any] = {}
    for key in ("task", "storage", "study_name"):
        if key in data:
            kwargs[key] = _check(
                key, data[key], str, lambda v: bool(v.strip()), "a non-empty string"
            )
    for key, low, high in (("trials", 1, MAX_TRIALS), ("seed", 0, MAX_SEED)):
        if key in data:
            kwargs[key] = _check(
                key,
                data[key],
                int,
                lambda v, lo=low, hi=high: lo <= v <= hi,
                f"an integer in [{low}, {high}]",
            )
    if "sampler" in data:
        kwargs["sampler"] = _check(
            "sampler",
            data["sampler"],
            str,
            lambda v: v in SAMPLERS,
            f"one of {', '.join(SAMPLERS)}",
        )
    if "timeout" in data:
        try:
            kwargs["timeout"] = parse_duration(data["timeout"])
        except SpecError as e:
            raise SpecError(f"key 'timeout': {e}") from None
    if "early_stop" in data:
        kwargs["early_stop"] = _early_stop(data["early_stop"])
    if "device" in data:
        kwargs["device"] = _check(
            "device", data["device"], str, _is_device, _one_of(devices.DEVICES)
        )
    if "finetune" in data:
        kwargs["finetune"] = _finetune(
            _check("finetune", data["finetune"], dict, lambda v: True, "a table")
        )
    if "objectives" in data:
        kwargs["objectives"] = check_objectives(data["objectives"])
    for key, read in _TABLES.items():
        if key in data:
            table = _check(key, data[key], dict, lambda v: True, "a table")
            try:
                kwargs[key] = read(table)
            except SpecError as e:
                raise SpecError(f"[{key}] {e}") from None
    spec = StudySpec(**kwargs)
    check_granularities(spec.objectives, spec.space.granularities)
    check_quantizations(spec.objectives, spec.space.quantizations, spec.space.granularities)
    return spec


def _early_stop(value: Any) -> EarlyStop:
    if isinstance(value, bool):
        return EarlyStop() if value else EarlyStop(margin=None)
    table = _check("early_stop", value, dict, lambda v: True, "true, false or a table")
    try:
        return EarlyStop.from_dict(table)
    except SpecError as e:
        raise SpecError(f"[early_stop] {e}") from None


def _finetune(table: dict[str, Any]) -> Finetune:
    checks = {
        "epochs": (int, lambda v: v >= 0, "an integer >= 0"),
        "lr": (float, lambda v: 0 < v <= MAX_LR, f"a number > 0 and <= {MAX_LR:g}"),
        "batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
        "precision": (str, lambda v: v in devices.PRECISIONS, _one_of(devices.PRECISIONS)),
        "steps": (int, lambda v: v >= 1, "an integer >= 1"),
        "grad_accumulation": (int, lambda v: v >= 1, "an integer >= 1"),
        "val_batches": (int, lambda v: v >= 1, "an integer >= 1"),
    }
    try:
        check_keys(table, Finetune, "key")
    except SpecError as e:
        raise SpecError(f"[finetune] {e}") from None
    kwargs = {}
    for key, value in table.items():
        kind, ok, what = checks[key]
        kwargs[key] = _check(f"finetune.{key}", value, kind, ok, what)
    if "epochs" in kwargs and "steps" in kwargs:  # steps would win: one budget, not two
        raise SpecError(
            f"[finetune] give epochs or steps, not both (got epochs = {kwargs['epochs']}, "
            f"steps = {kwargs['steps']})"
        )
    return Finetune(**kwargs)


def _is_device(name: str) -> bool:
    try:
        devices.check_device(name)
    except TaskError:
        return False
    return True


def _one_of(names: tuple[str, ...]) -> str:
    return f"one of {', '.join(names)}"


def _check(key: str, value: Any, kind: type, ok: Any, what: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
        raise SpecError(f"key {key!r} must be {what}, got {value!r}")
    return value
