"""autoprune: search pruning policies of a PyTorch model with Optuna."""

from autoprune._version import __version__
from autoprune.allocation import ALLOCATIONS, allocate, heuristic_policy, register_allocation
from autoprune.artifacts import ArtifactSpec
from autoprune.constraints import Constraints
from autoprune.criteria import CRITERIA, Criterion, get_criterion, register_criterion
from autoprune.dashboard import write_report
from autoprune.errors import AutopruneError, SpecError, StorageError, TaskError, TrialFailed
from autoprune.export import export, load, pick
from autoprune.heuristics import WarmStart, baseline
from autoprune.masks import apply_masks, compute_masks, fold_masks, prunable_layers
from autoprune.model_file import export_model, export_trial, load_model
from autoprune.objective import PruneResult, prune_and_finetune
from autoprune.policy import Policy
from autoprune.report import pareto_front
from autoprune.search import load_study, materialize, search
from autoprune.space import SearchSpace, suggest_policy
from autoprune.stopping import EarlyStop
from autoprune.task import Task, accuracy

__all__ = [
    "ArtifactSpec",
    "ALLOCATIONS",
    "CRITERIA",
    "AutopruneError",
    "Constraints",
    "Criterion",
    "EarlyStop",
    "Policy",
    "PruneResult",
    "SearchSpace",
    "SpecError",
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
    "export_model",
    "export_trial",
    "fold_masks",
    "get_criterion",
    "load",
    "load_model",
    "heuristic_policy",
    "load_study",
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
