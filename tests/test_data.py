"""Data loaders: the offline default, checksums, the search path, the offline error, CIFAR."""

import gzip
import hashlib
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from bpsim import data
from conftest import shared_data_available


def test_digits_is_scaled_split_and_stratified():
    train, test = data.load("digits")
    x, y = train.tensors
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    assert len(train) + len(test) == 1797 and len(test) == 450
    ptr = np.bincount(y.numpy(), minlength=10) / len(y)
    pte = np.bincount(test.tensors[1].numpy(), minlength=10) / len(test)
    assert np.abs(ptr - pte).max() < 0.01  # stratified
    # the split is fixed: other seeds give the same test set
    _, test2 = data.load("digits", seed=5)
    assert torch.equal(test.tensors[0], test2.tensors[0])


def test_subsampling_is_seeded():
    a, _ = data.load("digits", n_train=100, n_test=30)
    b, _ = data.load("digits", n_train=100, n_test=30)
    c, _ = data.load("digits", n_train=100, n_test=30, seed=1)
    assert len(a) == 100 and torch.equal(a.tensors[0], b.tensors[0])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    with pytest.raises(ValueError, match="n_train"):
        data.load("digits", n_train=0)


def test_unknown_name():
    with pytest.raises(ValueError, match="choose one of"):
        data.load("imagenet")


def test_teacher_regression():
    train, test = data.load("teacher", n_train=200, n_test=50)
    assert train.tensors[0].shape == (200, 20) and train.tensors[1].shape == (200, 1)
    assert data.describe("teacher").task == "regression"
    assert train.tensors[1].std() > 0.1


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_and_checksum(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte.gz": _idx_bytes(rng.integers(0, 256, (6, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx_bytes(np.arange(6) % 10),
        "t10k-images-idx3-ubyte.gz": _idx_bytes(rng.integers(0, 256, (4, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx_bytes(np.arange(4)),
    }
    (tmp_path / "mnist").mkdir()
    for name, blob in files.items():
        (tmp_path / "mnist" / name).write_bytes(blob)
    sums = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sums)
    monkeypatch.setenv("BPSIM_DATA", str(tmp_path))
    train, test = data.load("mnist", download=False)
    assert train.tensors[0].shape == (6, 1, 28, 28) and test.tensors[1].tolist() == [0, 1, 2, 3]
    assert data.search_dirs("mnist")[0] == tmp_path / "mnist"  # $BPSIM_DATA comes first
    # a corrupted file is refused with advice
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx_bytes(np.arange(4) + 1))
    with pytest.raises(ValueError, match="SHA-256"):
        data.load("mnist", download=False)


def test_offline_and_absent_names_three_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("BPSIM_DATA", str(tmp_path / "nothing"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_repo_shared_data", lambda: tmp_path / "no-shared")
    monkeypatch.setitem(data.MIRRORS, "fashion-mnist", ["http://127.0.0.1:9/"])  # nothing listens
    with pytest.raises(FileNotFoundError) as e:
        data.load("fashion-mnist")
    msg = str(e.value)
    assert "BPSIM_DATA" in msg and "shared/data" in msg and "download" in msg


@pytest.mark.skipif(not shared_data_available("mnist"),
                    reason="MNIST files not found in $BPSIM_DATA, ../shared/data or ~/.cache/bpsim and this test does not download")
def test_real_mnist_checksums_and_shapes():
    train, test = data.load("mnist", download=False)
    assert train.tensors[0].shape == (60000, 1, 28, 28) and len(test) == 10000
    assert set(train.tensors[1].unique().tolist()) == set(range(10))


@pytest.mark.skipif(not shared_data_available("fashion-mnist"),
                    reason="Fashion-MNIST files not found and this test does not download")
def test_real_fashion_mnist_subsample():
    train, test = data.load("fashion-mnist", n_train=500, n_test=100, download=False)
    assert len(train) == 500 and len(test) == 100


class _Boom:
    """Unpickling this writes a marker file: proves whether a pickle was opened."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cifar_tar(tmp_path, batches: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, obj in batches.items():
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def test_cifar10_tiny_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
    blob = _cifar_tar(tmp_path, {"data_batch_1": batch(5), "data_batch_2": batch(3), "test_batch": batch(4)})
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(blob)
    monkeypatch.setitem(data.CHECKSUMS, "cifar10", {"cifar-10-python.tar.gz": hashlib.sha256(blob).hexdigest()})
    train, test = data.load("cifar10", root=tmp_path)
    assert train.tensors[0].shape == (8, 3, 32, 32) and len(test) == 4
    assert 0 <= train.tensors[0].min() and train.tensors[0].max() <= 1


def test_cifar10_unchecked_pickle_is_never_opened(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    blob = _cifar_tar(tmp_path, {"data_batch_1": _Boom(str(marker)), "test_batch": _Boom(str(marker))})
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(blob)
    # the checksum in the code is the real CIFAR-10 one: this file cannot match it
    with pytest.raises(ValueError, match="SHA-256"):
        data.load("cifar10", root=tmp_path)
    assert not marker.exists()
