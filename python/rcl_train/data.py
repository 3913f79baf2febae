"""Datasets: Fashion-MNIST-LT (IDX gzip files), CIFAR-10-LT and CIFAR-100-LT (python-pickle files).

Everything is read from local files; nothing is downloaded. Images come back as uint8 tensors
[N, C, H, W] with int64 labels [N]. The long-tailed training subset keeps
``n_k = int(n_max * (1/rho)^(k/(C-1)))`` images of class k, drawn at random with a fixed seed
(the profile of Cao et al., LDAM, used by BCL); the test set stays balanced.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import error_reason

DEFAULT_FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fmnist-lt", "cifar10-lt", "cifar100-lt")

FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FMNIST_HELP = (
    "Install the Debian/Ubuntu package with `sudo apt-get install -y dataset-fashion-mnist` "
    f"(it puts the IDX gzip files under {DEFAULT_FMNIST_ROOT}), or pass --data-root DIR with "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz (plain, un-gzipped IDX files work too)."
)
CIFAR_HELP = (
    "Get the python version of the dataset ({archive} from https://www.cs.toronto.edu/~kriz/cifar.html), "
    "extract it and pass --data-root pointing at the extracted '{folder}' folder or its parent. "
    "Nothing is downloaded automatically."
)


class DataNotFoundError(FileNotFoundError):
    """The dataset files are missing; the message says where we looked and how to get them."""


@dataclass
class LTDataset:
    """A long-tailed training split and a balanced test split, held as tensors."""

    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    class_names: list[str]
    root: str
    extra: dict = field(default_factory=dict)

    @property
    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.train_y, minlength=self.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


# ---------------------------------------------------------------------------------------------
# File formats

def _open_maybe_gzip(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip or plain) of unsigned bytes: magic 0x0000 0x08 ndim, dims (big-endian)."""
    try:
        with _open_maybe_gzip(path) as f:
            head = f.read(4)
            if len(head) != 4 or head[0] != 0 or head[1] != 0:
                raise ValueError(f"{path}: not an IDX file (bad magic {head!r})")
            if head[2] != 0x08:
                raise ValueError(f"{path}: IDX data type 0x{head[2]:02x} unsupported (expected 0x08 = ubyte)")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) != 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need {4 * ndim} "
                                 f"bytes, the file has {len(raw_dims)}")
            dims = struct.unpack(">" + "I" * ndim, raw_dims)
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: unreadable ({'corrupt or truncated gzip: ' if path.endswith('.gz') else ''}"
                         f"{error_reason(e)})") from e
    expected = int(np.prod(dims)) if dims else 1
    if len(data) != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data for shape {dims}, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz). Used by the tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload += array.tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def _find_idx(root: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    return None


def load_fashion_mnist(root: str | None = None):
    """Return (train_x, train_y, test_x, test_y, class_names) from the IDX files under root."""
    root = root or DEFAULT_FMNIST_ROOT
    paths = {k: _find_idx(root, stem) for k, stem in FMNIST_FILES.items()}
    missing = [FMNIST_FILES[k] + ".gz" for k, p in paths.items() if p is None]
    if missing:
        where = "the directory does not exist" if not os.path.isdir(root) else "missing " + ", ".join(missing)
        raise DataNotFoundError(f"Fashion-MNIST not found in {root} ({where}). {FMNIST_HELP}")
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"Fashion-MNIST {split} files in {root} disagree: images {x.shape}, labels {y.shape}"
            )
        check_labels(y, len(FMNIST_CLASSES), paths[f"{split}_labels"])
    def images(a):
        return torch.from_numpy(a.copy()).unsqueeze(1)  # [N, 1, 28, 28]
    def labels(a):
        return torch.from_numpy(a.astype(np.int64))
    return (images(arrays["train_images"]), labels(arrays["train_labels"]),
            images(arrays["test_images"]), labels(arrays["test_labels"]), list(FMNIST_CLASSES))


def check_labels(labels: np.ndarray, num_classes: int, path: str, field: str | None = None) -> None:
    """Every label must name a class: one out of range would silently vanish from the data."""
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        where = f"{path}: {field!r}" if field else path
        raise ValueError(f"{where}: label {int(labels[i])} at position {i} is out of range "
                         f"0..{num_classes - 1} ({int(bad.sum())} such labels)")


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable that a CIFAR python file never holds."""


def _latin1_encode(text, encoding="latin1"):
    # Python 3's pickle protocol 2 writes bytes as _codecs.encode(str, "latin1"); no other codec.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _RefusedGlobal(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _numpy_globals() -> dict:
    """(module, name) -> object for what a pickled NumPy array or scalar names: the array
    reconstructor, ndarray, dtype and the scalar constructor, under the module names of NumPy 1
    (numpy.core) and NumPy 2 (numpy._core), so that files written by either load."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = reconstruct
        table[(module, "scalar")] = scalar
    return table


_SAFE_GLOBALS = {**_numpy_globals(), ("_codecs", "encode"): _latin1_encode}


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR python pickle without running code: only dicts, lists, tuples, strings,
    bytes, numbers and NumPy arrays (with their dtypes) come out; any other global the pickle
    names (a function it would call, a class it would build) is refused before it is loaded."""

    def find_class(self, module: str, name: str):
        obj = _SAFE_GLOBALS.get((module, name))
        if obj is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return obj


def _unpickle(path: str) -> dict:
    # A CIFAR batch is a pickled dict; any failure to read one (truncated, not a pickle, a
    # global it may not name) is reported with the file's name.
    try:
        with open(path, "rb") as f:
            d = CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise ValueError(f"{path}: refused: the pickle names {e}, which a CIFAR python file never "
                         "holds (only dicts, lists, strings, bytes, integers and NumPy arrays); "
                         "it was not loaded") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable CIFAR python pickle ({error_reason(e)})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return d


def _key(d: dict, name: str, path: str):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise ValueError(f"{path}: no {name!r} entry (keys: {', '.join(map(repr, d))})")


def _cifar_pixels(value, path: str) -> np.ndarray:
    """The 'data' entry: uint8 rows of 3 x 32 x 32 pixels (converting other dtypes would wrap
    values above 255 and turn [0, 1] floats into black images)."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{path}: 'data': expected a NumPy array of uint8 pixels, got "
                         f"{type(value).__name__}")
    if value.dtype != np.uint8:
        raise ValueError(f"{path}: 'data': expected uint8 pixels 0..255, got dtype {value.dtype}")
    if value.ndim != 2 or value.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data': expected data [n, 3072] (rows of 3 x 32 x 32 pixels), "
                         f"got shape {list(value.shape)}")
    return value


def _cifar_labels(value, path: str, field: str, num_classes: int) -> np.ndarray:
    """A label entry: a list (or 1-D integer array) of integers 0..num_classes-1; a float, a
    string or None is refused rather than truncated or parsed."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise ValueError(f"{path}: {field!r}: expected a 1-D array of integer labels, got "
                             f"dtype {value.dtype} and shape {list(value.shape)}")
        labels = value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{path}: {field!r}: label at position {i} is {v!r} "
                                 f"({type(v).__name__}); expected an integer 0..{num_classes - 1}")
        labels = np.array(value, dtype=object)  # Python ints of any size until range-checked
    else:
        raise ValueError(f"{path}: {field!r}: expected a list of integer labels, got "
                         f"{type(value).__name__}")
    check_labels(labels, num_classes, path, field)
    return labels.astype(np.int64)


def _cifar_arrays(paths: list[str], label_key: str, num_classes: int):
    xs, ys = [], []
    for path in paths:
        b = _unpickle(path)
        x = _cifar_pixels(_key(b, "data", path), path)
        y = _cifar_labels(_key(b, label_key, path), path, label_key, num_classes)
        if y.shape != (x.shape[0],):
            raise ValueError(f"{path}: expected data [n, 3072] and {label_key} [n], got "
                             f"{list(x.shape)} and {list(y.shape)}")
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


def load_cifar(num_classes: int, root: str | None):
    """Return (train_x, train_y, test_x, test_y, class_names) from the python-pickle CIFAR files."""
    if num_classes == 10:
        folder, archive, train_files, test_files = (
            "cifar-10-batches-py", "cifar-10-python.tar.gz",
            [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    elif num_classes == 100:
        folder, archive, train_files, test_files = (
            "cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"])
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    else:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    help_text = CIFAR_HELP.format(archive=archive, folder=folder)
    if not root:
        raise DataNotFoundError(f"CIFAR-{num_classes} needs --data-root. {help_text}")
    candidates = [os.path.join(root, folder), root]
    base = next((c for c in candidates
                 if all(os.path.isfile(os.path.join(c, f)) for f in train_files + test_files)), None)
    if base is None:
        raise DataNotFoundError(
            f"CIFAR-{num_classes} not found: looked for {', '.join(train_files + test_files)} in "
            f"{' and '.join(candidates)}. {help_text}")
    train_x, train_y = _cifar_arrays([os.path.join(base, f) for f in train_files], label_key,
                                     num_classes)
    test_x, test_y = _cifar_arrays([os.path.join(base, f) for f in test_files], label_key,
                                   num_classes)
    names = [f"class_{i}" for i in range(num_classes)]
    meta_path = os.path.join(base, meta_file)
    if os.path.isfile(meta_path):  # optional: class names only
        raw = _key(_unpickle(meta_path), names_key, meta_path)
        if not isinstance(raw, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in raw):
            raise ValueError(f"{meta_path}: {names_key!r}: expected a list of class names "
                             f"(bytes or str), got {type(raw).__name__}")
        names = [n.decode(errors="replace") if isinstance(n, bytes) else n for n in raw]
        if len(names) != num_classes:
            raise ValueError(f"{meta_path}: {len(names)} class names in {names_key!r}, "
                             f"expected {num_classes}")
    return train_x, train_y, test_x, test_y, names


# ---------------------------------------------------------------------------------------------
# Long-tailed sampling

def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """n_k = max(1, int(n_max * (1/rho)^(k/(C-1)))) for k = 0..C-1 (class 0 is the head)."""
    if imbalance < 1:
        raise ValueError(f"imbalance ratio must be >= 1, got {imbalance}")
    if num_classes == 1:
        return [int(n_max)]
    # int() as in LDAM/BCL; at least one image so that no class vanishes from tiny datasets
    return [max(1, int(n_max * (1.0 / imbalance) ** (k / (num_classes - 1.0))))
            for k in range(num_classes)]


def long_tail_indices(labels: torch.Tensor, num_classes: int, imbalance: float, seed: int = 0) -> torch.Tensor:
    """Indices of a long-tailed subset: a random n_k of each class k, drawn with a fixed seed."""
    labels = labels.cpu()
    per_class = [torch.nonzero(labels == k).flatten() for k in range(num_classes)]
    n_max = max(len(p) for p in per_class)
    targets = long_tail_counts(n_max, num_classes, imbalance)
    g = torch.Generator().manual_seed(int(seed))
    chosen = []
    for k, idx in enumerate(per_class):
        take = min(targets[k], len(idx))
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:take]])
    return torch.sort(torch.cat(chosen)).values


def stratified_limit(labels: torch.Tensor, num_classes: int, limit: int, seed: int = 0) -> torch.Tensor:
    """Indices of about `limit` items keeping each class's share (at least one per present class)."""
    labels = labels.cpu()
    total = len(labels)
    if limit >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    chosen = []
    for k in range(num_classes):
        idx = torch.nonzero(labels == k).flatten()
        if len(idx) == 0:
            continue
        take = max(1, int(round(len(idx) * limit / total)))
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:take]])
    return torch.sort(torch.cat(chosen)).values


def check_splits(name: str, root, train_x, train_y, test_x, test_y, names) -> None:
    """What training and evaluation need of the data: every class in the training set (a class
    without images has no long-tail share and a count of 0 that the losses refuse), a test set,
    and test images of the training images' size."""
    counts = torch.bincount(train_y, minlength=len(names))
    if (counts == 0).any():
        missing = [f"{k} ({names[k]})" for k in torch.nonzero(counts == 0).flatten().tolist()]
        raise ValueError(f"{name} in {root}: the training set has no image of class "
                         f"{', '.join(missing)}; every class needs at least one")
    if len(test_y) == 0:
        raise ValueError(f"{name} in {root}: the test set is empty")
    if tuple(test_x.shape[1:]) != tuple(train_x.shape[1:]):
        raise ValueError(f"{name} in {root}: test images are {list(test_x.shape[1:])} "
                         f"(channels, height, width) but training images are "
                         f"{list(train_x.shape[1:])}")


def load_dataset(name: str, root: str | None = None, imbalance: float = 100.0, seed: int = 0,
                 limit_train: int | None = None, limit_test: int | None = None) -> LTDataset:
    """Load `name` (fmnist-lt, cifar10-lt, cifar100-lt) and draw its long-tailed training subset."""
    if name == "fmnist-lt":
        root = root or DEFAULT_FMNIST_ROOT
        tx, ty, vx, vy, names = load_fashion_mnist(root)
    elif name in ("cifar10-lt", "cifar100-lt"):
        tx, ty, vx, vy, names = load_cifar(10 if name == "cifar10-lt" else 100, root)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    num_classes = len(names)
    check_splits(name, root, tx, ty, vx, vy, names)
    idx = long_tail_indices(ty, num_classes, imbalance, seed)
    tx, ty = tx[idx], ty[idx]
    if limit_train is not None:
        keep = stratified_limit(ty, num_classes, limit_train, seed)
        tx, ty = tx[keep], ty[keep]
    if limit_test is not None:
        keep = stratified_limit(vy, num_classes, limit_test, seed)
        vx, vy = vx[keep], vy[keep]
    return LTDataset(name=name, train_x=tx, train_y=ty, test_x=vx, test_y=vy,
                     num_classes=num_classes, class_names=names, root=str(root),
                     extra={"imbalance": imbalance, "data_seed": seed})
