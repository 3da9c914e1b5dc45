"""autoprune's one weight format: exact round trips, bytes that shrink with sparsity, old files
that still load, and files that are never unpickled."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_structured import build

from autoprune.errors import StorageError
from autoprune.pruning.codec import FORMAT, exported_bytes, load_state, save_state
from autoprune.pruning.policy import Policy


def sparse_state(sparsity: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(64, 128, generator=g)
    weight[torch.rand(64, 128, generator=g) < sparsity] = 0.0
    return {
        "layer.weight": weight,
        "layer.bias": torch.randn(64, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": weight[:8].to(torch.bfloat16),
    }


def assert_same(loaded: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(state)  # the state dict's order, too
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape, key
        assert torch.equal(loaded[key], tensor), key


def test_weights_round_trip_exactly(tmp_path: Path) -> None:
    state = sparse_state(0.9)
    state["layer.weight"][0, 0] = -0.0  # a folded mask leaves signed zeros: still zero
    save_state(state, tmp_path / "w.pt")
    assert_same(load_state(tmp_path / "w.pt"), state)
    assert_same(load_state(str(tmp_path / "w.pt")), state)
    with open(tmp_path / "w.pt", "rb") as f:  # from a stream too (the artifact store's)
        assert_same(load_state(f), state)
    buffer = io.BytesIO()  # and to a stream
    save_state(state, buffer)
    assert buffer.getvalue() == (tmp_path / "w.pt").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]  # no temporary file left


def test_sparse_tensors_are_stored_as_bits_and_values(tmp_path: Path) -> None:
    model, _ = build("digits-mlp")
    with torch.no_grad():
        model[0].weight[torch.rand(model[0].weight.shape) < 0.9] = 0.0
    save_state(model.state_dict(), tmp_path / "m.pt")
    data = torch.load(tmp_path / "m.pt", weights_only=True)
    assert data["format"] == FORMAT
    sparse = data["tensors"]["0.weight"]
    nonzero = int(torch.count_nonzero(model[0].weight))
    assert sparse["shape"] == list(model[0].weight.shape)
    assert sparse["values"].numel() == nonzero
    assert sparse["mask"].numel() == (model[0].weight.numel() + 7) // 8
    assert torch.equal(data["tensors"]["2.weight"], model[2].weight)  # dense stays dense
    assert_same(load_state(tmp_path / "m.pt"), model.state_dict())


def test_bytes_on_disk_shrink_with_sparsity(tmp_path: Path) -> None:
    sizes = {}
    for sparsity in (0.0, 0.5, 0.9, 0.98):
        path = tmp_path / f"{sparsity}.pt"
        save_state(sparse_state(sparsity), path)
        sizes[sparsity] = path.stat().st_size
    buffer = io.BytesIO()
    torch.save(sparse_state(0.9), buffer)
    dense = len(buffer.getvalue())
    assert sizes[0.0] <= dense * 1.01  # a dense tensor is stored dense: no overhead
    assert sizes[0.0] > sizes[0.5] > sizes[0.9] > sizes[0.98]
    assert sizes[0.9] < 0.25 * dense  # 32 KiB of weights: 1 KiB of bits + 3.3 KiB of values


def test_exported_bytes_are_the_file_size_whatever_its_name(tmp_path: Path) -> None:
    model, _ = build("digits-mlp")
    with torch.no_grad():
        model[0].weight[torch.rand(model[0].weight.shape) < 0.5] = 0.0
    for name in ("model.pt", "w", "a-much-longer-file-name.weights"):
        save_state(model.state_dict(), tmp_path / name)
        assert (tmp_path / name).stat().st_size == exported_bytes(model), name


def test_front_weights_written_the_old_way_still_load(tmp_path: Path) -> None:
    # Exactly what autoprune 0.1's study/artifacts.py save_weights wrote.
    state = sparse_state(0.9)
    weight = state["layer.weight"]
    nonzero = weight != 0
    bits = torch.from_numpy(np.packbits(nonzero.flatten().numpy(), bitorder="little"))
    old = {
        "format": 1,
        "dense": {k: v for k, v in state.items() if k != "layer.weight"},
        "sparse": {
            "layer.weight": {
                "mask": bits,
                "values": weight[nonzero].clone(),
                "shape": torch.tensor(weight.shape, dtype=torch.int64),
            }
        },
    }
    torch.save(old, tmp_path / "old.pt")
    loaded = load_state(tmp_path / "old.pt")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_file_is_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Policy))  # a pickled class: code that would run
    with pytest.raises(StorageError, match=f"cannot read weights '{path}': ") as error:
        load_state(path)
    assert "\n" not in str(error.value)
    torch.save({"a": torch.ones(1)}, path)
    with pytest.raises(StorageError) as error:
        load_state(path)
    assert str(error.value) == (
        f"'{path}' is not an autoprune weights file (format 'autoprune-weights/2')"
    )
    torch.save({"format": FORMAT, "tensors": {"w": {"mask": torch.ones(1)}}}, path)
    with pytest.raises(StorageError, match=f"'{path}' is a damaged autoprune weights file: "):
        load_state(path)
    with pytest.raises(StorageError, match=r"cannot read weights \(stream\): "):
        load_state(io.BytesIO(b"not a zip"))


def packed(**change: object) -> dict[str, object]:
    """A packed tensor as save_state writes it (shape [3, 5], 4 nonzeros), with ``change``."""
    weight = torch.zeros(3, 5)
    weight.view(-1)[[0, 3, 7, 14]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    nonzero = weight != 0
    part = {
        "mask": torch.from_numpy(np.packbits(nonzero.flatten().numpy(), bitorder="little")),
        "values": weight[nonzero].clone(),
        "shape": [3, 5],
    }
    return {**part, **change}


def sparse_coo() -> torch.Tensor:
    # Indices far out of range, unchecked: touching it could crash the interpreter.
    index = torch.tensor([[10**9]])
    return torch.sparse_coo_tensor(index, torch.ones(1), (3,), check_invariants=False)


BAD_WEIGHTS = {
    "huge shape": (
        {"w": packed(shape=[2**40])},
        "'w': shape [1099511627776] needs a mask of 137438953472 bytes, the file holds 2",
    ),
    "shape too small": ({"w": packed(shape=[3])}, "'w': shape [3] needs a mask of 1 bytes"),
    "negative shape": ({"w": packed(shape=[-3, -5])}, "'w': shape is not a list of integers"),
    "string shape": ({"w": packed(shape=["3", 5])}, "'w': shape is not a list of integers"),
    "bool shape": ({"w": packed(shape=[True, 15])}, "'w': shape is not a list of integers"),
    "shape not a list": ({"w": packed(shape=15)}, "'w': shape is not a list of integers"),
    "float shape tensor": (
        {"w": packed(shape=torch.tensor([3.0, 5.0]))},
        "'w': shape is a torch.float32 tensor",
    ),
    "float mask": (
        {"w": packed(mask=torch.ones(2))},
        "'w': mask is not a contiguous 1-d uint8 tensor",
    ),
    "2-d mask": (
        {"w": packed(mask=torch.zeros(1, 2, dtype=torch.uint8))},
        "'w': mask is not a contiguous 1-d uint8 tensor",
    ),
    "too few values": (
        {"w": packed(values=torch.ones(3))},
        "'w': mask has 4 nonzeros, the file holds 3 values",
    ),
    "too many values": (
        {"w": packed(values=torch.ones(10**4))},
        "'w': mask has 4 nonzeros, the file holds 10000 values",
    ),
    "integer values": (
        {"w": packed(values=torch.ones(4, dtype=torch.int64))},
        "'w': values are not a contiguous 1-d float tensor",
    ),
    "2-d values": (
        {"w": packed(values=torch.ones(2, 2))},
        "'w': values are not a contiguous 1-d float",
    ),
    "padding bits": (
        {"w": packed(mask=torch.tensor([0b10001001, 0b11000000], dtype=torch.uint8))},
        "'w': mask has bits set past its 15 elements",
    ),
    "missing part": ({"w": {"mask": torch.ones(1)}}, "'w' is not a dense tensor or mask/values"),
    "extra part": ({"w": packed(extra=1)}, "'w' is not a dense tensor or mask/values/shape"),
    "odd part names": (
        {"w": {1: 2, "a": 3}},
        "'w' is not a dense tensor or mask/values/shape: [1",
    ),
    "expanded mask": (
        {"w": packed(mask=torch.full((1,), 255, dtype=torch.uint8).expand(2**37), shape=[2**40])},
        "'w': mask is not a contiguous 1-d uint8 tensor",  # 2 kB of file, 1 TiB of bits
    ),
    "expanded values": ({"w": packed(values=torch.ones(1).expand(4))}, "'w': values are not"),
    "a string": ({"w": "weights"}, "'w' is not a dense tensor or mask/values/shape: str"),
    "sparse tensor": ({"w": sparse_coo()}, "tensor 'w' is not a dense tensor"),
    "meta tensor": ({"w": torch.empty(2**40, device="meta")}, "tensor 'w' is not a dense"),
    "integer name": ({3: torch.ones(1)}, "tensor name 3 is not a string"),
}


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", list(BAD_WEIGHTS))
def test_hostile_weights_are_one_line_storage_errors(tmp_path: Path, name: str) -> None:
    tensors, message = BAD_WEIGHTS[name]
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "tensors": tensors}, path)
    with pytest.raises(StorageError) as error:
        load_state(path)
    assert str(error.value).startswith(f"'{path}' is a damaged autoprune weights file: ")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"format": FORMAT, "tensors": [torch.ones(1)]}, "'tensors' is list, not a dict"),
        ({"format": FORMAT}, "'tensors' is NoneType, not a dict of tensors"),
        ({"format": 1, "dense": {}, "sparse": None}, "'sparse' is NoneType, not a dict"),
        ({"format": 1, "dense": {"w": torch.ones(1)}, "sparse": {"w": packed()}}, "stored twice"),
    ],
)
def test_hostile_weight_layouts_are_one_line_storage_errors(
    tmp_path: Path, data: dict[str, object], message: str
) -> None:
    path = tmp_path / "model.pt"
    torch.save(data, path)
    with pytest.raises(StorageError, match=f"damaged autoprune weights file: .*{message}"):
        load_state(path)


def test_weights_that_are_not_regular_files_are_refused(tmp_path: Path) -> None:
    for path, why in [
        (tmp_path / "empty.pt", "cannot read weights '.*empty.pt': "),
        (tmp_path / "zero.pt", "cannot read weights '.*zero.pt': not a regular file"),
        (tmp_path / "dir.pt", "cannot read weights '.*dir.pt': not a regular file"),
        (tmp_path / "none.pt", "cannot read weights '.*none.pt': no such file"),
        (tmp_path / "dangling.pt", "cannot read weights '.*dangling.pt': no such file"),
    ]:
        if path.name == "empty.pt":
            path.touch()
        elif path.name == "zero.pt":
            path.symlink_to("/dev/zero")  # would read forever
        elif path.name == "dir.pt":
            path.mkdir()
        elif path.name == "dangling.pt":
            path.symlink_to(tmp_path / "gone")
        with pytest.raises(StorageError, match=why):
            load_state(path)
    # A symlink to a real weights file is a weights file.
    save_state({"w": torch.ones(3)}, tmp_path / "real.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "real.pt")
    assert torch.equal(load_state(tmp_path / "link.pt")["w"], torch.ones(3))
    torch.save({"format": True, "tensors": {}}, tmp_path / "bool.pt")  # True == 1, yet no int
    with pytest.raises(StorageError, match="is not an autoprune weights file"):
        load_state(tmp_path / "bool.pt")
