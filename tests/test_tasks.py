"""Built-in tasks, their model cache, and task references ("package.module:function")."""

from __future__ import annotations

import logging
import pickle
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprune import Task, TaskError
from autoprune.pruning.masks import prunable_layers
from autoprune.study.setup import model_fingerprint
from autoprune.tasks import TASKS, load_task
from autoprune.tasks import _cache as cache
from autoprune.train import evaluate


def cache_files() -> list[Path]:
    return sorted(cache.cache_dir().glob("*.pt"))


def cache_file_of(model: nn.Module) -> Path:
    """The one cache entry that holds ``model``'s weights."""
    state = model.state_dict()

    def holds(path: Path) -> bool:
        stored = torch.load(path, weights_only=True)
        same_keys = stored.keys() == state.keys()
        return same_keys and all(torch.equal(stored[k], state[k]) for k in state)

    (path,) = [p for p in cache_files() if holds(p)]
    return path


# A transformer learns the digits' pixel grid from 1,078 images: less accurate than a CNN.
MIN_ACCURACY = {"digits-bert": 0.92}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TASKS))
def test_builtin_task_contract(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every built-in task: accurate dense model, prunable layers, data that fits, cached."""
    if name == "digits-bert":
        pytest.importorskip("transformers")
    task = load_task(name, seed=0)
    assert task.name == name
    assert evaluate(task.model, task, "val")[0] >= MIN_ACCURACY.get(name, 0.97)
    assert evaluate(task.model, task, "test")[0] >= MIN_ACCURACY.get(name, 0.97)
    assert not task.model.training
    assert len(prunable_layers(task.model)) >= 2
    task.check()
    path = cache_file_of(task.model)
    assert path.name.startswith(f"{name}-")

    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="autoprune"):
        again = load_task(name, seed=0)
    seconds = time.perf_counter() - start
    assert again.model is not task.model
    for (key, a), (key_b, b) in zip(
        task.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert key == key_b and torch.equal(a, b)
    assert cache_file_of(again.model) == path
    assert "trained" not in caplog.text and seconds < 2.0  # loaded, not trained again


@pytest.mark.slow
def test_dense_training_does_not_depend_on_the_thread_count(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Workers and machines with other thread counts train the very same dense model: here
    on two threads, as this session's cache holds it trained on one (conftest)."""
    assert torch.get_num_threads() == 1
    # The CNN: its convolutions sum in another order on two threads than on one.
    one = model_fingerprint(load_task("digits-cnn", seed=0).model)
    monkeypatch.setenv("AUTOPRUNE_CACHE_DIR", str(tmp_path))  # empty: trained again
    torch.set_num_threads(2)
    try:
        two = model_fingerprint(load_task("digits-cnn", seed=0).model)
        assert torch.get_num_threads() == 2  # restored after training
    finally:
        torch.set_num_threads(1)
    assert one == two


def test_digits_split_is_fixed() -> None:
    task = load_task("digits-mlp", seed=0)
    sizes = {split: len(getattr(task, split)[0]) for split in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    assert task.train[0].shape[1:] == (64,)
    assert float(task.train[0].min()) >= 0.0 and float(task.train[0].max()) <= 1.0


class Recorder:
    """A stand-in for training: sets every weight to a constant and counts its calls."""

    def __init__(self, value: float = 0.5) -> None:
        self.calls, self.value = 0, value

    def __call__(self, model: nn.Module) -> None:
        self.calls += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(self.value)


class Unpickled:
    """Leaves a marker file if it is ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("AUTOPRUNE_CACHE_DIR", str(directory))
    return directory


KEY = {"task": "toy", "seed": 0}


def toy() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_cache_trains_once_then_loads(own_cache: Path) -> None:
    train = Recorder()
    cache.cached_model(toy(), KEY, train)
    assert train.calls == 1
    (path,) = own_cache.iterdir()
    assert path.name.startswith("toy-") and path.suffix == ".pt"
    model = cache.cached_model(toy(), KEY, train)
    assert train.calls == 1
    assert all(torch.all(p == 0.5) for p in model.parameters())
    # Any change of the key is another entry.
    cache.cached_model(toy(), {**KEY, "seed": 1}, train)
    assert train.calls == 2 and len(list(own_cache.iterdir())) == 2


def foreign_state_dict(path: Path) -> None:
    torch.save(nn.Linear(4, 3).state_dict(), path)


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a torch file\xff" * 10)


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


@pytest.mark.parametrize("spoil", [garbage, truncated, foreign_state_dict])
def test_unusable_cache_entry_is_retrained_over(own_cache: Path, spoil) -> None:
    cache.cached_model(toy(), KEY, Recorder(0.5))
    (path,) = own_cache.iterdir()
    spoil(path)
    train = Recorder(0.25)
    model = cache.cached_model(toy(), KEY, train)
    assert train.calls == 1
    assert all(torch.all(p == 0.25) for p in model.parameters())
    # The entry was replaced by a good one.
    assert cache.cached_model(toy(), KEY, Recorder()).state_dict()["0.weight"][0, 0] == 0.25
    assert [p.name for p in own_cache.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("save", [pickle.dump, torch.save])
def test_arbitrary_objects_are_never_unpickled(own_cache: Path, tmp_path: Path, save) -> None:
    cache.cached_model(toy(), KEY, Recorder())
    (path,) = own_cache.iterdir()
    marker = tmp_path / "unpickled"
    with path.open("wb") as f:
        save(Unpickled(marker), f)
    train = Recorder(0.25)
    model = cache.cached_model(toy(), KEY, train)
    assert not marker.exists()
    assert train.calls == 1 and float(model.state_dict()["2.bias"][0]) == 0.25


@pytest.mark.slow
def test_corrupt_builtin_cache_is_retrained_over(caplog: pytest.LogCaptureFixture) -> None:
    first = load_task("digits-mlp", seed=0)
    path = cache_file_of(first.model)
    path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        again = load_task("digits-mlp", seed=0)  # retrained over: training is seeded
    assert f"ignoring unusable cached model {path}" in caplog.text
    for a, b in zip(first.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert cache_file_of(again.model) == path


@pytest.mark.slow
def test_seed_changes_cache_entry_and_weights() -> None:
    a = load_task("digits-mlp", seed=0)
    b = load_task("digits-mlp", seed=1)
    assert cache_file_of(a.model) != cache_file_of(b.model)
    assert not torch.equal(a.model[0].weight, b.model[0].weight)
    assert torch.equal(a.train[0], b.train[0])  # the split does not depend on the seed


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AUTOPRUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "autoprune"


USER_MODULE = """
import torch
from torch import nn

import autoprune


def make():
    torch.manual_seed(0)
    x, y = torch.rand(20, 4), torch.randint(0, 2, (20,))
    return autoprune.Task(model=nn.Linear(4, 2), train=(x, y), val=(x, y), name="user")


def not_a_task():
    return 42


def broken():
    raise RuntimeError("no data here")


value = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"autoprune_user_tasks_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_task(user_module: str) -> None:
    task = load_task(f"{user_module}:make", seed=5)
    assert isinstance(task, Task) and task.name == "user"
    assert isinstance(task.model, nn.Linear)


def test_builtin_names() -> None:
    from autoprune.tasks import TASKS

    assert set(TASKS) == {"digits-cnn", "digits-mlp", "digits-resnet", "digits-bert"}


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (
            "digits-xyz",
            "unknown task 'digits-xyz' (built-in: digits-cnn, digits-mlp, digits-resnet, "
            "digits-bert; "
            "or give package.module:function)",
        ),
        (
            "nosuch.module:make",
            "task 'nosuch.module:make' does not import: No module named 'nosuch'",
        ),
        ("{mod}:missing", "task '{mod}:missing' does not import: module '{mod}' has no attribute"),
        ("{mod}:not_a_task", "task '{mod}:not_a_task' returned int, not an autoprune.Task"),
        ("{mod}:value", "task '{mod}:value' raised TypeError: 'int' object is not callable"),
        ("{mod}:broken", "task '{mod}:broken' raised RuntimeError: no data here"),
        (":make", "task reference ':make' is not package.module:function"),
        ("..x:f", "task reference '..x:f' is not package.module:function"),  # was a TypeError
        (".x:f", "task reference '.x:f' is not package.module:function"),
        ("os:", "task reference 'os:' is not package.module:function"),
        ("os:path:join", "task reference 'os:path:join' is not package.module:function"),
    ],
)
def test_bad_references(user_module: str, ref: str, expected: str) -> None:
    ref, expected = ref.format(mod=user_module), expected.format(mod=user_module)
    with pytest.raises(TaskError) as info:
        load_task(ref)
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_digits_bert_without_transformers_says_what_to_install(monkeypatch) -> None:
    import sys

    from autoprune.errors import TaskError
    from autoprune.tasks.digits_bert import digits_bert_model

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(TaskError, match=r"^task 'digits-bert' needs transformers: pip install"):
        digits_bert_model()
