"""autoprune: search pruning policies of a PyTorch model with Optuna.

The public names are imported when first used (``autoprune.search``, ``from autoprune import
Task``): the commands that only read a study (``autoprune status``, ``front``, ``pick``,
``report``) then never import torch, which alone takes seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autoprune._version import __version__
from autoprune.errors import (
    AutopruneError,
    OutputError,
    SpecError,
    StorageError,
    TaskError,
    TrialFailed,
)

# Each public name, by the module that defines it.
_WHERE = {
    "export": "autoprune.deploy.directory",
    "load": "autoprune.deploy.directory",
    "ALLOCATIONS": "autoprune.pruning.allocation",
    "allocate": "autoprune.pruning.allocation",
    "heuristic_policy": "autoprune.pruning.allocation",
    "register_allocation": "autoprune.pruning.allocation",
    "CRITERIA": "autoprune.pruning.criteria",
    "Criterion": "autoprune.pruning.criteria",
    "get_criterion": "autoprune.pruning.criteria",
    "register_criterion": "autoprune.pruning.criteria",
    "apply_masks": "autoprune.pruning.masks",
    "compute_masks": "autoprune.pruning.masks",
    "fold_masks": "autoprune.pruning.masks",
    "prunable_layers": "autoprune.pruning.masks",
    "Policy": "autoprune.pruning.policy",
    "pareto_front": "autoprune.report.data",
    "write_report": "autoprune.report.page",
    "search": "autoprune.run.searching",
    "ArtifactSpec": "autoprune.study.artifacts",
    "Constraints": "autoprune.study.constraints",
    "Fidelity": "autoprune.study.fidelity",
    "pick": "autoprune.study.pick",
    "StudySetup": "autoprune.study.setup",
    "make_setup": "autoprune.study.setup",
    "read_setup": "autoprune.study.setup",
    "SearchSpace": "autoprune.study.space",
    "suggest_policy": "autoprune.study.space",
    "EarlyStop": "autoprune.study.stopping",
    "load_study": "autoprune.study.loading",
    "materialize": "autoprune.study.study",
    "WarmStart": "autoprune.study.warm_start",
    "Task": "autoprune.task",
    "accuracy": "autoprune.task",
    "PruneResult": "autoprune.trial",
    "baseline": "autoprune.trial",
    "prune_and_finetune": "autoprune.trial",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


if TYPE_CHECKING:
    from autoprune.deploy.directory import export, load
    from autoprune.pruning.allocation import (
        ALLOCATIONS,
        allocate,
        heuristic_policy,
        register_allocation,
    )
    from autoprune.pruning.criteria import CRITERIA, Criterion, get_criterion, register_criterion
    from autoprune.pruning.masks import apply_masks, compute_masks, fold_masks, prunable_layers
    from autoprune.pruning.policy import Policy
    from autoprune.report.data import pareto_front
    from autoprune.report.page import write_report
    from autoprune.run.searching import search
    from autoprune.study.artifacts import ArtifactSpec
    from autoprune.study.constraints import Constraints
    from autoprune.study.fidelity import Fidelity
    from autoprune.study.loading import load_study
    from autoprune.study.pick import pick
    from autoprune.study.setup import StudySetup, make_setup, read_setup
    from autoprune.study.space import SearchSpace, suggest_policy
    from autoprune.study.stopping import EarlyStop
    from autoprune.study.study import materialize
    from autoprune.study.warm_start import WarmStart
    from autoprune.task import Task, accuracy
    from autoprune.trial import PruneResult, baseline, prune_and_finetune

__all__ = [
    "ArtifactSpec",
    "ALLOCATIONS",
    "CRITERIA",
    "AutopruneError",
    "Constraints",
    "Criterion",
    "EarlyStop",
    "Fidelity",
    "OutputError",
    "Policy",
    "PruneResult",
    "SearchSpace",
    "SpecError",
    "StudySetup",
    "StorageError",
    "Task",
    "TaskError",
    "TrialFailed",
    "WarmStart",
    "__version__",
    "accuracy",
    "allocate",
    "apply_masks",
    "baseline",
    "compute_masks",
    "export",
    "fold_masks",
    "get_criterion",
    "load",
    "heuristic_policy",
    "load_study",
    "make_setup",
    "read_setup",
    "materialize",
    "pareto_front",
    "pick",
    "prunable_layers",
    "prune_and_finetune",
    "register_allocation",
    "register_criterion",
    "search",
    "suggest_policy",
    "write_report",
]
