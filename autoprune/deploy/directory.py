"""Export the pruned model of a trial to a directory, and load an export back.

An export directory holds ``model.pt`` (the state dict with the masks folded in, in autoprune's
weight format: see :mod:`autoprune.pruning.codec`), ``policy.json``, ``metrics.json`` and
``export.json`` (the task reference that rebuilds the architecture and, for a structured
trial, the plan that shrinks it). Exporting reads the trial's stored weights (see
:mod:`autoprune.study.artifacts`); a trial without them (an old study, or ``keep = "none"``)
is replayed with :func:`autoprune.study.study.materialize` instead.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autoprune import measure
from autoprune._files import check_output_dir
from autoprune._version import __version__
from autoprune.deploy import example, onnx
from autoprune.deploy.manifest import read_manifest, short
from autoprune.errors import DeployFailed, OutputError, SpecError, StorageError, TaskError
from autoprune.inference import OnnxModel, deploy
from autoprune.pruning import structured
from autoprune.pruning.codec import exported_bytes, load_state, save_state
from autoprune.pruning.masks import count_nonzero
from autoprune.pruning.policy import Policy
from autoprune.study.artifacts import FrontWeights
from autoprune.study.setup import read_setup, study_task
from autoprune.study.study import replay
from autoprune.study.trial_metrics import (
    ACCURACY,
    metric_names,
    study_total_params,
    trial_metrics,
)
from autoprune.study.trials import full_trial
from autoprune.task import Task, default_forward
from autoprune.tasks import TASKS, load_task
from autoprune.train import evaluate

logger = logging.getLogger(__name__)

FILES = ("model.pt", "policy.json", "metrics.json", "export.json")


@dataclasses.dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: where, from which trial, how (artifact or replay), numbers."""

    directory: Path
    trial: int
    source: str
    metrics: dict[str, Any]


def default_task_ref(study: optuna.Study) -> str:
    """The task reference of ``study``'s setup, else its task's name (right for built-ins)."""
    setup = read_setup(study)
    return setup.task_ref or setup.task


def export(
    study: optuna.Study,
    trial_number: int,
    out: str | Path,
    *,
    task: Task | None = None,
    task_ref: str | None = None,
    artifact_dir: str | Path | None = None,
    format: str | None = None,
) -> Exported:
    """Write trial ``trial_number``'s pruned model, policy and metrics to directory ``out``.

    Args:
        format: ``"pytorch"``: ``model.pt``, the weights in autoprune's format, which
            :func:`load` puts into the architecture. ``"onnx"``: ``model.onnx``, the model as
            deployed (quantized as the trial was), checked against PyTorch and timed in ONNX
            Runtime (see :mod:`autoprune.deploy.onnx`). Default: the format of the runtime
            the trial was measured in.
        task: The study's task (default: rebuilt from ``task_ref``).
        task_ref: The task reference stored in the export, which :func:`load` rebuilds the
            architecture from (default: :func:`default_task_ref`).
        artifact_dir: Where the study's weights are (default: where the study recorded them,
            else next to its SQLite file).

    Raises:
        SpecError: If the trial is not a completed autoprune trial of the study, ``out``
            exists and is not empty, the format is unknown, or a quantized trial is asked
            for in the ``pytorch`` format.
        OutputError: If ``out`` cannot be made (checked before any work), or written.
        TaskError: If the task cannot be rebuilt.
        DeployFailed: If the ONNX model cannot be made, or is off PyTorch's outputs.
    """
    out = check_output_dir(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"output directory {str(out)!r} exists and is not empty")
    trial = _completed_trial(study, trial_number)
    policy = Policy.from_dict(trial.user_attrs["policy"])
    format = _format(format, policy, trial.number)
    setup = read_setup(study)
    task_ref = task_ref or setup.task_ref or setup.task
    task = task or study_task(setup, task_ref)
    model, source, plan, deployed = _trial_model(study, trial, task, task_ref, artifact_dir)
    metrics = _measure(model, task, list(setup.layers))
    recorded = trial_metrics(trial, metric_names(study), total_params=study_total_params(study))
    files: dict[str, bytes] = {}
    if format == "onnx":
        deployed = deployed or deploy(model, task, policy.quantization)
        metrics |= onnx.check_and_measure(model, deployed, task, recorded[ACCURACY])
        files["model.onnx"] = deployed.data
    else:
        files["model.pt"] = _encoded(model)
    if metrics["accuracy"] != recorded[ACCURACY]:
        logger.warning(
            "trial %d's model has val accuracy %.6f here, not the recorded %.6f",
            trial.number,
            metrics["accuracy"],
            recorded[ACCURACY],
        )
    recorded = {k: v for k, v in recorded.items() if math.isfinite(v)}  # JSON has no NaN
    metrics = {"study": study.study_name, "trial": trial.number, **metrics, "recorded": recorded}
    manifest = {
        "format": 1,
        "autoprune": __version__,
        "task": task_ref,
        "seed": setup.seed,
        "study": study.study_name,
        "trial": trial.number,
        "source": source,
    }
    if plan is not None:  # the smaller architecture, rebuilt by :func:`load` from the dense one
        manifest |= {"plan": plan.to_dict(), "example": example.describe(task.example(1))}
    if format == "onnx":
        manifest |= {"runtime": "onnxruntime", "quantization": policy.quantization}
    _write(out, files, trial.user_attrs["policy"], metrics, manifest)
    return Exported(out, trial.number, source, metrics)


FORMATS = ("pytorch", "onnx")


def _format(format: str | None, policy: Policy, number: int) -> str:
    if format is None:
        return "onnx" if policy.runtime == "onnxruntime" else "pytorch"
    if format not in FORMATS:
        raise SpecError(f"unknown export format {format!r} (known: {', '.join(FORMATS)})")
    if format == "pytorch" and policy.quantization != "none":
        raise SpecError(
            f"trial {number} is quantized ({policy.quantization}): its deployed model is ONNX;"
            " export it with format 'onnx'"
        )
    return format


def _encoded(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    save_state(model.state_dict(), buffer)
    return buffer.getvalue()


def _trial_model(
    study: optuna.Study,
    trial: FrozenTrial,
    task: Task,
    task_ref: str,
    artifact_dir: str | Path | None,
) -> tuple[nn.Module, str, structured.Plan | None, OnnxModel | None]:
    """The trial's model (eval mode) from its stored weights, else replayed; which of the
    two; the structured plan that shrank its architecture, if any; and the model as the
    trial deployed it, when a replay made it."""
    if trial.user_attrs["policy"].get("granularity") == "structured":
        # A smaller architecture: the replay also gives the plan that rebuilds it.
        result = replay(task, trial)
        return result.model.eval(), "replay", result.plan, result.deployed
    weights = FrontWeights.find(study, artifact_dir)
    state = weights.load(trial) if weights is not None else None
    if state is None:
        logger.warning("trial %d has no stored weights: replaying it", trial.number)
        result = replay(task, trial)
        return result.model.eval(), "replay", None, result.deployed
    model = _with_weights(task.model, state, f"task {task_ref!r}")
    return model, "artifact", None, None


def _with_weights(
    model: nn.Module, state: dict[str, torch.Tensor], what: str, source: Path | None = None
) -> nn.Module:
    """A copy of ``model`` (eval mode) with ``state`` loaded, or one line naming the first key
    that does not fit (and the file it came from)."""
    model = copy.deepcopy(model)
    weights = "the stored weights" if source is None else f"the weights in {str(source)!r}"
    mismatch = _first_mismatch(model.state_dict(), state)
    if mismatch is not None:
        raise TaskError(f"{weights} do not fit the model of {what}: {mismatch}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:  # e.g. a dtype that does not convert
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TaskError(f"{weights} do not fit the model of {what}: {first}") from e
    return model.eval()


def _first_mismatch(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> str | None:
    for key, tensor in expected.items():
        if key not in state:
            return f"key {key!r} is missing"
        if state[key].shape != tensor.shape:
            return (
                f"key {key!r} has shape {list(state[key].shape)}, "
                f"the model's is {list(tensor.shape)}"
            )
        if _kind(state[key]) != _kind(tensor):  # load_state_dict would cast, e.g. drop .imag
            return f"key {key!r} holds {state[key].dtype}, the model's is {tensor.dtype}"
    for key in state:
        if key not in expected:
            return f"key {short(key)} is not in the model"
    return None


def _kind(tensor: torch.Tensor) -> str:
    if tensor.is_complex():
        return "complex"
    if tensor.is_floating_point():
        return "float"
    return "bool" if tensor.dtype == torch.bool else "integer"


def _completed_trial(study: optuna.Study, number: int) -> FrozenTrial:
    trial = full_trial(study, number)  # that trial only, not the study
    if trial is None:
        raise SpecError(f"study {study.study_name!r} has no trial {number}")
    if trial.state != TrialState.COMPLETE or "policy" not in trial.user_attrs:
        raise SpecError(f"trial {number} is {trial.state.name.lower()}, not a completed trial")
    return trial


def _measure(model: nn.Module, task: Task, layers: list[str]) -> dict[str, Any]:
    # A structured policy may have removed whole blocks: their layers count as zeros.
    present = set(dict(model.named_modules()))
    nonzero = count_nonzero(model, [name for name in layers if name in present])[0]
    total = count_nonzero(task.model, layers)[1]
    params = list(model.parameters())
    context = measure.Context(task.example(1), (), forward=task.forward)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    metrics: dict[str, Any] = {
        "accuracy": evaluate(model, task, "val")[0],
        "test_accuracy": evaluate(model, task, "test")[0] if task.test is not None else None,
        "nonzero_params": nonzero,
        "total_params": total,
        "model_params": sum(p.numel() for p in params),
        "model_nonzero_params": sum(int(torch.count_nonzero(p)) for p in params),
        "bytes": exported_bytes(model),  # what model.pt holds, as the bytes objective counts
        "dense_bytes": len(buffer.getvalue()),
        "macs": int(measure.macs(model, context)),
    }
    return metrics


def macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (one sample), as the ``macs``
    objective counts them. Dense: zeros are multiplied too."""
    return int(measure.macs(model, measure.Context(example, ())))


def _write(out: Path, files: dict[str, bytes], policy: Any, metrics: Any, manifest: Any) -> None:
    try:
        _write_files(out, files, policy, metrics, manifest)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {str(out)!r}: {e.strerror or e}") from e


def _write_files(
    out: Path, files: dict[str, bytes], policy: Any, metrics: Any, manifest: Any
) -> None:
    # Written next to ``out`` and renamed into place: a failure leaves no half export.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        for name, data in (("policy", policy), ("metrics", metrics), ("export", manifest)):
            text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
            (tmp / f"{name}.json").write_text(text, encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(
    directory: str | Path,
    *,
    task: Task | None = None,
    base: nn.Module | None = None,
    trust_task_code: bool = False,
) -> nn.Module:
    """Rebuild an exported model (eval mode) and load its weights from ``model.pt``; an ONNX
    export's ``model.onnx`` comes back as an :class:`~autoprune.inference.OnnxModel` that runs
    it in ONNX Runtime (called like the model it was exported from).

    The dense architecture comes from ``base`` (copied; its weights are replaced), else from
    ``task``'s model, else from the task reference recorded in the export; a structured
    export's plan then removes the same channels and blocks from it (the stored indices: no
    scores, no data). Nothing is unpickled, and nothing the export names is imported unless
    ``trust_task_code``: an export is a file people share.

    Args:
        task: The task whose model is the dense architecture.
        base: The dense architecture itself.
        trust_task_code: Build the architecture from a ``module:function`` reference recorded
            in ``export.json`` by importing and calling it (only for an export you trust; the
            export directory is never put on ``sys.path``). Built-in task names need no opt-in.

    Raises:
        SpecError: If both ``task`` and ``base`` are given.
        StorageError: If ``directory`` is not an autoprune export, its ``export.json`` is
            malformed, or its ``model.pt`` is not an autoprune weights file.
        TaskError: If the stored task reference names code and ``trust_task_code`` is not set,
            does not build a task, or the weights do not fit the architecture.
    """
    if task is not None and base is not None:
        raise SpecError("give load() a task or a base model, not both")
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("runtime") == "onnxruntime":  # model.onnx: no architecture to rebuild
        return _onnx_model(directory / "model.onnx")
    if base is not None:
        what = "the given base model"
    elif task is not None:
        what, base = "the given task", task.model
    else:
        ref = manifest["task"]
        if ":" in ref and ref not in TASKS and not trust_task_code:
            raise TaskError(
                f"export {str(directory)!r} names task code {ref!r}: importing it runs that code;"
                " pass load(..., trust_task_code=True) if you trust the export, or give task="
                " or base="
            )
        what = f"task {ref!r}"
        base = load_task(ref, seed=manifest["seed"]).model
    model = base
    if "plan" in manifest:
        model = copy.deepcopy(base)
        if "example" in manifest:
            inputs = example.build(manifest["example"])
        else:  # exports of autoprune 0.2 and older: one input tensor
            inputs = torch.zeros(manifest["input_shape"])
        forward = task.forward if task is not None else default_forward
        plan = structured.Plan.from_dict(manifest["plan"])
        try:
            _check_plan(plan, dict(model.named_modules()))
            structured.apply_plan(model, plan, inputs, forward=forward)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TaskError(f"the export's plan does not fit the model of {what}: {first}") from e
    weights = directory / "model.pt"
    return _with_weights(model, load_state(weights), what, weights)


def _onnx_model(path: Path) -> OnnxModel:
    try:
        if not path.is_file():
            raise OSError("no such file" if not path.exists() else "not a regular file")
        data = path.read_bytes()
    except OSError as e:
        raise StorageError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    try:
        return OnnxModel(data).eval()
    except DeployFailed as e:
        raise StorageError(f"{str(path)!r}: {e}") from None


def _check_plan(plan: structured.Plan, modules: dict[str, nn.Module]) -> None:
    """Refuse a plan naming blocks or layers the model lacks, or channels past a layer's
    (torch-pruning would skip them silently)."""
    for block in plan.removed_blocks:
        if not block or block not in modules:
            raise TaskError(f"the plan removes block {block!r}, which the model lacks")
    for layer, idxs in plan.channels.items():
        if layer not in modules:
            raise TaskError(f"the plan prunes layer {layer!r}, which the model lacks")
        weight = getattr(modules[layer], "weight", None)
        if idxs and isinstance(weight, torch.Tensor) and idxs[-1] >= weight.shape[0]:
            raise TaskError(
                f"the plan removes channel {idxs[-1]} of layer {layer!r}, "
                f"which has {weight.shape[0]}"
            )
