"""What an autoprune study records about itself, read without building its typed setup.

:func:`autoprune.study.setup.read_setup` builds the whole :class:`StudySetup`, and with it the
search space, criteria and measures, which import torch (seconds). The commands that only read
a study (``status``, ``front``, ``pick``, ``report``) need three of its facts: the task's
name, the target number of trials and the dense model's numbers. They read them here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

# Study user attr holding the setup (``StudySetup.to_dict``).
STUDY_ATTR = "autoprune"
# The layout of that record; studies of autoprune 0.1 stored an older, unversioned one.
FORMAT = 2
# Study user attr of per-layer sensitivity curves: {layer: [[sparsity, accuracy], ...]}.
SENSITIVITY_ATTR = "autoprune_sensitivity"


def recorded(study: optuna.Study) -> Mapping[str, Any] | None:
    """The setup record of ``study`` as stored (plain data); None for a study that holds none."""
    data = study.user_attrs.get(STUDY_ATTR)
    return data if isinstance(data, Mapping) else None


def recorded_dense(study: optuna.Study) -> dict[str, float]:
    """The dense model's numbers (accuracy, nonzero and total params, size objectives), as
    the study recorded them when it was created; empty for a study that holds none."""
    data = recorded(study) or {}
    return dict(data.get("dense") or {})


def recorded_target(study: optuna.Study) -> int | None:
    """The study's target number of trials (None: until a timeout, or none recorded)."""
    data = recorded(study)
    if data is None:
        return None
    if data.get("format") != FORMAT:  # autoprune 0.1 kept the run's spec beside the setup
        return (data.get("spec") or {}).get("trials")
    return data.get("trials")


def recorded_task(study: optuna.Study) -> str | None:
    """The name of the study's task; None for a study that holds no setup."""
    data = recorded(study)
    return None if data is None else data.get("task")
