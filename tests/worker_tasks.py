"""Tasks that worker processes of the tests import by reference (``worker_tasks:tiny``).

Importable from a subprocess whose PYTHONPATH holds this directory. The dense model is
trained on one thread, so that every process builds the same weights (the study's
fingerprint check holds).
"""

from __future__ import annotations

import os
import time

import torch
from conftest import make_task
from torch import Tensor
from torch.nn import functional as F

import autoprune

# Seconds each loss evaluation of the slow task sleeps: ~10 per trial (6 fine-tune batches,
# 3 validation, 3 test), so that a test can signal or kill a worker in mid-trial.
SLOW_BATCH = float(os.environ.get("AUTOPRUNE_TEST_SLOW_BATCH", "0.15"))


def tiny() -> autoprune.Task:
    """The tiny CNN task of conftest: a trial takes a few milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_task()
    finally:
        torch.set_num_threads(threads)


def slow() -> autoprune.Task:
    """The tiny task whose every batch waits ``SLOW_BATCH`` seconds (about 2 s per trial)."""

    def slow_loss(outputs: Tensor, targets: Tensor) -> Tensor:
        time.sleep(SLOW_BATCH)
        return F.cross_entropy(outputs, targets)

    import dataclasses

    return dataclasses.replace(tiny(), loss=slow_loss, name="tiny-slow")
