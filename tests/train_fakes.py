"""Tiny datasets written in the real on-disk formats (IDX gzip, CIFAR python pickles) for the
rcl_train tests, and a helper that makes `rcl_train` importable from a source checkout."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import rcl_train  # noqa: F401
except ImportError:  # running from a checkout without the editable install
    sys.path.insert(0, os.path.join(ROOT, "python"))

from rcl_train.data import write_idx  # noqa: E402


def _images(rng, n, shape, labels):
    """Random images with a class-dependent brightness so that the classes are learnable."""
    base = rng.integers(0, 60, size=(n,) + shape)
    return (base + 18 * labels.reshape((-1,) + (1,) * len(shape))).clip(0, 255).astype(np.uint8)


def write_fake_fashion(root, per_class_train=30, per_class_test=6, num_classes=10, seed=0,
                       gzip_files=True):
    """Fashion-MNIST-shaped IDX files: 28x28 uint8 images, labels 0..9."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    suffix = ".gz" if gzip_files else ""
    for split, per in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(num_classes), per)).astype(np.uint8)
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte{suffix}"),
                  _images(rng, len(labels), (28, 28), labels))
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte{suffix}"), labels)
    return str(root)


def tiny_args(root, out, *extra):
    """rcl-train flags of a tiny CPU run on write_fake_fashion(root, per_class_train=24): rho 8
    (102 images), batch 16, 6 steps per epoch, 2 epochs, quiet."""
    return ["--dataset", "fmnist-lt", "--data-root", str(root), "--imbalance", "8",
            "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "0.5", "--feat-dim", "16",
            "--threads", "1", "--device", "cpu", "--no-progress", "--no-plots", "--out", str(out),
            *extra]


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar(root, num_classes=10, per_class_train=20, per_class_test=4, seed=0):
    """CIFAR python-pickle files (cifar-10-batches-py/ or cifar-100-python/) under root."""
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        labels = rng.permutation(np.repeat(np.arange(10), per_class_train))
        data = _images(rng, len(labels), (3 * 32 * 32,), labels)
        for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
            _dump(os.path.join(folder, f"data_batch_{i}"),
                  {b"data": data[part], b"labels": labels[part].tolist(),
                   b"batch_label": f"training batch {i} of 5".encode()})
        tl = rng.permutation(np.repeat(np.arange(10), per_class_test))
        _dump(os.path.join(folder, "test_batch"),
              {b"data": _images(rng, len(tl), (3072,), tl), b"labels": tl.tolist()})
        _dump(os.path.join(folder, "batches.meta"),
              {b"label_names": [f"c{k}".encode() for k in range(10)], b"num_vis": 3072})
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for split, per in (("train", per_class_train), ("test", per_class_test)):
            labels = rng.permutation(np.repeat(np.arange(100), per))
            _dump(os.path.join(folder, split),
                  {b"data": _images(rng, len(labels), (3072,), labels % 12),
                   b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist()})
        _dump(os.path.join(folder, "meta"),
              {b"fine_label_names": [f"f{k}".encode() for k in range(100)]})
    return folder
