"""Shared fixtures: tiny models and tasks that train in well under a second on a CPU."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
import torch
from torch import nn

import autoprune
from autoprune.measure import DEFAULT_OBJECTIVES
from autoprune.pruning.calibration import LayerStats
from autoprune.study.setup import Recipe, write_setup
from autoprune.study.study import open_study
from autoprune.tasks.resnet import ResNet
from autoprune.train import fit


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Built-in dense models are trained once per test session, never in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOPRUNE_CACHE_DIR", str(tmp_path_factory.mktemp("autoprune-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Tiny models run faster on one thread than on several that wait on each other, and the
    suite's time then holds steady on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def fake_stats(
    model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
) -> dict[str, LayerStats]:
    """Random calibration statistics, shaped as :func:`autoprune.pruning.calibration.calibrate`
    shapes them, for every layer of ``types``: for planning without data."""
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    g = torch.Generator().manual_seed(1)
    grads = [torch.rand(m.weight.shape, generator=g) for _, m in modules]
    stats = {}
    for (name, m), grad in zip(modules, grads, strict=True):
        weight = m.weight
        rows = weight.shape[0] if getattr(m, "groups", 1) > 1 else 1
        norm = torch.rand(rows, weight.shape[1], *(1,) * (weight.dim() - 2), generator=g)
        stats[name] = LayerStats(grad, torch.rand(weight.shape, generator=g), norm)
    return stats


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 8x8 images, told apart by which third of the image is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.5
    for i, label in enumerate(y.tolist()):
        x[i, 0, :, label * 2 : label * 2 + 3] += 1.0
    return x, y


def make_task(**overrides: object) -> autoprune.Task:
    """A TinyCNN trained to high accuracy on :func:`make_data` (about 0.2 s)."""
    torch.manual_seed(0)
    model = TinyCNN()
    train, val, test = make_data(192, 0), make_data(96, 1), make_data(96, 2)
    task = autoprune.Task(
        model=model,
        train=train,
        val=val,
        test=test,
        finetune_epochs=1,
        lr=1e-2,
        batch_size=32,
        name="tiny",
    )
    fit(model, task, epochs=5, seed=0)
    model.eval()
    if overrides:
        import dataclasses

        task = dataclasses.replace(task, **overrides)
    return task


@pytest.fixture(scope="session")
def _trained_task() -> autoprune.Task:
    return make_task()


@pytest.fixture
def tiny_task(_trained_task: autoprune.Task) -> autoprune.Task:
    """A trained tiny task; each test gets its own copy of the model."""
    import copy
    import dataclasses

    return dataclasses.replace(_trained_task, model=copy.deepcopy(_trained_task.model))


def tiny_resnet() -> nn.Module:
    return ResNet(in_channels=1, widths=(6, 8), blocks_per_stage=2, classes=3)


@pytest.fixture(scope="module")
def resnet_task() -> autoprune.Task:
    """A tiny ResNet (BatchNorm, residual blocks) trained briefly on the three-class data."""
    return make_resnet_task()


def make_resnet_task() -> autoprune.Task:
    """The task of the ``resnet_task`` fixture (worker processes build it too)."""
    torch.manual_seed(0)
    model = tiny_resnet()
    task = autoprune.Task(
        model=model,
        train=make_data(192, 0),
        val=make_data(96, 1),
        test=make_data(96, 2),
        finetune_epochs=1,
        lr=1e-2,
        name="tiny-resnet",
    )
    fit(model, task, epochs=3, seed=0)
    return task


def new_study(
    task: autoprune.Task,
    *,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    **settings: Any,
) -> optuna.Study:
    """A study of ``task`` opened as ``autoprune search`` opens one (``settings`` are
    :func:`autoprune.make_setup`'s), without the default warm starts unless asked for."""
    settings.setdefault("warm_start", None)
    setup = autoprune.make_setup(task, **settings)
    return open_study(setup, task, storage=storage, study_name=study_name)


def hand_setup(study: optuna.Study, **dense: float) -> None:
    """Store a setup with ``study`` as autoprune would, for a study made by hand: task
    ``hand``, the study's objectives, and the dense model's numbers ``dense``."""
    setup = autoprune.StudySetup(
        task="hand",
        model="0" * 16,
        finetune=Recipe(epochs=1, lr=1e-3, batch_size=32, calibration_batches=4),
        layers=(),
        space=autoprune.SearchSpace(),
        objectives=tuple(study.metric_names or DEFAULT_OBJECTIVES),
        latency=None,
        seed=0,
        dense=dense,
    )
    write_setup(study, setup)
