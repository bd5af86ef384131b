"""Datasets as ``(train, test)`` pairs of ``TensorDataset``.

``load("digits")`` needs nothing but scikit-learn and is the offline default
of the tests and the fast lessons. MNIST and Fashion-MNIST are read from the
canonical IDX gzip files and CIFAR-10 from the python pickle archive; every
file is checked against a SHA-256 kept in this module *before* it is parsed
(a pickle is never opened unchecked). Files are looked for, in order, in

1. ``$BPSIM_DATA/<name>/``,
2. ``../shared/data/<name>/`` next to the repository (developers and CI),
3. ``~/.cache/bpsim/<name>/``,

and otherwise downloaded into the cache with a progress bar.

Images come back as float32 tensors in [0, 1] with shape ``(N, C, H, W)``;
labels as int64. ``teacher`` is a synthetic regression task whose targets
come from a random "teacher" network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["load", "describe", "NAMES", "CHECKSUMS", "search_dirs"]

NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "teacher")

_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

#: SHA-256 of every file bpsim reads; a file that does not match is refused.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    },
}

#: Where a missing file is downloaded from (first mirror that answers wins).
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}


@dataclass(frozen=True)
class Description:
    """What a model needs to know about a dataset."""

    name: str
    input_shape: tuple[int, ...]
    n_classes: int  # output size: classes, or regression targets for ``teacher``
    task: str  # "classification" or "regression"


_DESCRIPTIONS = {
    "digits": Description("digits", (1, 8, 8), 10, "classification"),
    "mnist": Description("mnist", (1, 28, 28), 10, "classification"),
    "fashion-mnist": Description("fashion-mnist", (1, 28, 28), 10, "classification"),
    "cifar10": Description("cifar10", (3, 32, 32), 10, "classification"),
    "teacher": Description("teacher", (20,), 1, "regression"),
}


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    return name


def describe(name: str) -> Description:
    """Input shape, number of outputs and task of dataset ``name``."""
    return _DESCRIPTIONS[_check_name(name)]


def _repo_shared_data() -> Path:
    # bpsim/data.py -> repository root -> its sibling ``shared/data``
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def search_dirs(name: str) -> list[Path]:
    """The folders searched for dataset ``name``, in order."""
    dirs = []
    if os.environ.get("BPSIM_DATA"):
        dirs.append(Path(os.environ["BPSIM_DATA"]).expanduser() / name)
    dirs.append(_repo_shared_data() / name)
    dirs.append(_cache_dir() / name)
    return dirs


def _cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bpsim``, or ``~/.cache/bpsim`` when it is unset, empty or
    relative (as the XDG base directory specification asks), so a download
    never lands in the working directory."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "bpsim"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, expected: str) -> Path:
    got = sha256(path)
    if got != expected:
        raise ValueError(
            f"{path} has SHA-256 {got[:12]}..., expected {expected[:12]}...: the file is "
            f"corrupt or not the canonical one; delete it and load again to re-download"
        )
    return path


def _download(urls: list[str], dest: Path) -> None:
    from tqdm.auto import tqdm

    last: Exception | None = None
    for base in urls:
        url = base + dest.name
        tmp = None
        try:
            with urllib.request.urlopen(url, timeout=20) as r:
                dest.parent.mkdir(parents=True, exist_ok=True)   # only once a mirror answers
                total = int(r.headers.get("Content-Length") or 0) or None
                fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
                with os.fdopen(fd, "wb") as out, tqdm(
                    total=total, unit="B", unit_scale=True, desc=dest.name,
                    disable=not sys.stderr.isatty(),
                ) as bar:
                    for chunk in iter(lambda: r.read(1 << 16), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            os.replace(tmp, dest)
            return
        except (urllib.error.URLError, OSError, TimeoutError) as e:  # try the next mirror
            last = e
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    raise OSError(f"could not download {dest.name}: {last}")


def _find(name: str, fname: str, root: str | os.PathLike | None, download: bool) -> Path:
    """Locate (or fetch) one checked file of dataset ``name``."""
    expected = CHECKSUMS[name][fname]
    dirs = [Path(root) / name, Path(root)] if root is not None else search_dirs(name)
    for d in dirs:
        p = d / fname
        if p.is_file():
            return _verified(p, expected)
    if download and root is None:
        dest = _cache_dir() / name / fname
        try:
            _download(MIRRORS[name], dest)
        except OSError as e:
            err: Exception | None = e
        else:
            return _verified(dest, expected)
    else:
        err = None
    where = "\n  ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"dataset {name!r}: {fname} not found in\n  {where}\n"
        f"Provide it in one of three ways: set BPSIM_DATA to a folder holding {name}/{fname}; "
        f"put the files in ../shared/data/{name}/ next to the repository; or go online and "
        f"bpsim downloads them to {_cache_dir() / name}"
        + (f" (download failed: {err})" if err else "")
    )


# --------------------------------------------------------------------- readers
def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX (LeCun) gzip file into a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_idx(name: str, root, download: bool):
    arrays = [_read_idx(_find(name, f, root, download)) for f in _IDX_FILES]
    xtr, ytr, xte, yte = arrays
    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)
    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))
    return images(xtr), labels(ytr), images(xte), labels(yte)


def _load_cifar10(root, download: bool):
    path = _find("cifar10", "cifar-10-python.tar.gz", root, download)  # checksum verified here
    batches: dict[str, dict] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            if base.startswith("data_batch_") or base == "test_batch":
                f = tar.extractfile(member)
                assert f is not None
                batches[base] = pickle.load(io.BytesIO(f.read()), encoding="bytes")
    train_keys = sorted(k for k in batches if k.startswith("data_batch_"))
    if not train_keys or "test_batch" not in batches:
        raise ValueError(f"{path} does not hold CIFAR-10 data_batch_* and test_batch files")
    def stack(keys):
        x = np.concatenate([np.asarray(batches[k][b"data"], dtype=np.uint8) for k in keys])
        y = np.concatenate([np.asarray(batches[k][b"labels"], dtype=np.int64) for k in keys])
        x = torch.from_numpy(x.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        return x, torch.from_numpy(y)
    xtr, ytr = stack(train_keys)
    xte, yte = stack(["test_batch"])
    return xtr, ytr, xte, yte


def _load_digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    # A fixed stratified split (25% test): the same for every seed, so
    # accuracies from different runs are comparable.
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    t = torch.from_numpy
    return t(xtr), t(ytr), t(xte), t(yte)


def _load_teacher(seed: int, n_train: int, n_test: int):
    g = torch.Generator().manual_seed(1000 + seed)
    d_in, hidden = _DESCRIPTIONS["teacher"].input_shape[0], 32
    w1 = torch.randn(d_in, hidden, generator=g) / d_in**0.5
    w2 = torch.randn(hidden, 1, generator=g) / hidden**0.5
    x = torch.randn(n_train + n_test, d_in, generator=g)
    y = torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(n_train + n_test, 1, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _subsample(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int, what: str):
    if n is None:
        return x, y
    if n <= 0:
        raise ValueError(f"{what} must be a positive number of examples, got {n}")
    if n >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    idx, _ = idx.sort()
    return x[idx], y[idx]


def load(
    name: str = "digits",
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    root: str | os.PathLike | None = None,
    download: bool = True,
    seed: int = 0,
) -> tuple[TensorDataset, TensorDataset]:
    """Load dataset ``name`` as ``(train, test)`` ``TensorDataset`` pairs.

    Parameters
    ----------
    name : one of ``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``teacher``.
    n_train, n_test : keep a seeded random subset of this many examples
        (fast lessons); ``None`` keeps everything.
    root : read files from this folder only (``root/name/file`` or
        ``root/file``) instead of the search path; never downloads.
    download : fetch missing MNIST / Fashion-MNIST / CIFAR-10 files when online.
    seed : seed of the subsampling (and of the ``teacher`` network).
    """
    _check_name(name)
    if name == "digits":
        xtr, ytr, xte, yte = _load_digits(seed)
    elif name in ("mnist", "fashion-mnist"):
        xtr, ytr, xte, yte = _load_idx(name, root, download)
    elif name == "cifar10":
        xtr, ytr, xte, yte = _load_cifar10(root, download)
    else:
        xtr, ytr, xte, yte = _load_teacher(seed, n_train or 2000, n_test or 500)
    xtr, ytr = _subsample(xtr, ytr, n_train, seed, "n_train")
    xte, yte = _subsample(xte, yte, n_test, seed + 1, "n_test")
    return TensorDataset(xtr, ytr), TensorDataset(xte, yte)
