"""autoprune: search pruning policies of a PyTorch model with Optuna."""

from autoprune._version import __version__
from autoprune.criteria import CRITERIA, Criterion, get_criterion, register_criterion
from autoprune.errors import AutopruneError, SpecError, StorageError, TaskError, TrialFailed
from autoprune.export import export_model, export_trial, load_model
from autoprune.masks import apply_masks, compute_masks, fold_masks, prunable_layers
from autoprune.objective import PruneResult, prune_and_finetune
from autoprune.policy import Policy
from autoprune.report import pareto_front, write_report
from autoprune.search import load_study, materialize, search
from autoprune.space import SearchSpace, suggest_policy
from autoprune.task import Task, accuracy

__all__ = [
    "CRITERIA",
    "AutopruneError",
    "Criterion",
    "Policy",
    "PruneResult",
    "SearchSpace",
    "SpecError",
    "StorageError",
    "Task",
    "TaskError",
    "TrialFailed",
    "__version__",
    "accuracy",
    "apply_masks",
    "compute_masks",
    "export_model",
    "export_trial",
    "fold_masks",
    "get_criterion",
    "load_model",
    "load_study",
    "materialize",
    "pareto_front",
    "prunable_layers",
    "prune_and_finetune",
    "register_criterion",
    "search",
    "suggest_policy",
    "write_report",
]
