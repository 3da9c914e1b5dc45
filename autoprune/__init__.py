"""autoprune: search pruning policies of a PyTorch model with Optuna."""

from autoprune._version import __version__
from autoprune.deploy.directory import export, load
from autoprune.errors import (
    AutopruneError,
    OutputError,
    SpecError,
    StorageError,
    TaskError,
    TrialFailed,
)
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
from autoprune.study.pick import pick
from autoprune.study.setup import StudySetup, make_setup, read_setup
from autoprune.study.space import SearchSpace, suggest_policy
from autoprune.study.stopping import EarlyStop
from autoprune.study.study import load_study, materialize
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
