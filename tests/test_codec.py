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
