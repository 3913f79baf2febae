"""rcl_train data: IDX/CIFAR loaders on tiny files in the real formats, long-tailed sampling,
augmentation shapes, metrics and the schedule."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from train_fakes import write_fake_cifar, write_fake_fashion

from rcl_train import data as D
from rcl_train.metrics import compute_metrics, group_of
from rcl_train.optim import build_scheduler, warmup_steps_used


def test_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    for name in ("x.idx.gz", "x.idx"):
        D.write_idx(str(tmp_path / name), a)
        np.testing.assert_array_equal(D.read_idx(str(tmp_path / name)), a)


def test_idx_rejects_bad_files(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(str(p))
    p.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="expected 5 bytes"):
        D.read_idx(str(p))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_loader(tmp_path, gz):
    root = write_fake_fashion(tmp_path / "fm", per_class_train=12, per_class_test=3, gzip_files=gz)
    tx, ty, vx, vy, names = D.load_fashion_mnist(root)
    assert tx.shape == (120, 1, 28, 28) and tx.dtype == torch.uint8
    assert vx.shape == (30, 1, 28, 28) and vy.dtype == torch.int64
    assert torch.bincount(ty).tolist() == [12] * 10
    assert names[0] == "T-shirt/top" and len(names) == 10


def test_standard_long_tail_profile():
    # The CIFAR-10-LT / CIFAR-100-LT counts of LDAM and BCL at rho = 100.
    c10 = D.long_tail_counts(5000, 10, 100)
    assert c10 == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(D.long_tail_counts(500, 100, 100)) == 10847
    assert D.long_tail_counts(6000, 10, 100)[-1] == 60
    assert D.long_tail_counts(7, 1, 50) == [7]
    assert D.long_tail_counts(40, 4, 1) == [40, 40, 40, 40]
    assert D.long_tail_counts(24, 10, 100)[-1] == 1  # never zero
    with pytest.raises(ValueError, match="imbalance"):
        D.long_tail_counts(10, 3, 0.5)


def test_fmnist_lt_sampling(tmp_path):
    root = write_fake_fashion(tmp_path / "fm", per_class_train=30, per_class_test=4)
    ds = D.load_dataset("fmnist-lt", root, imbalance=10, seed=0)
    expected = D.long_tail_counts(30, 10, 10)
    assert ds.class_counts.tolist() == expected
    assert expected[0] == 30 and expected[-1] == 3
    # the test set stays balanced and whole
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [4] * 10
    # fixed seed: the same subset every time; another seed draws another subset
    again = D.load_dataset("fmnist-lt", root, imbalance=10, seed=0)
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.train_y, again.train_y)
    other = D.load_dataset("fmnist-lt", root, imbalance=10, seed=1)
    assert other.class_counts.tolist() == expected
    assert not torch.equal(ds.train_x, other.train_x)


def test_lt_indices_are_a_subset_per_class():
    labels = torch.arange(5).repeat_interleave(20)
    idx = D.long_tail_indices(labels, 5, imbalance=20, seed=3)
    assert len(set(idx.tolist())) == len(idx)
    assert torch.bincount(labels[idx], minlength=5).tolist() == D.long_tail_counts(20, 5, 20)


def test_cifar10_loader_and_lt(tmp_path):
    write_fake_cifar(tmp_path, num_classes=10, per_class_train=20, per_class_test=4)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        ds = D.load_dataset("cifar10-lt", str(root), imbalance=10, seed=0)
        assert ds.train_x.shape[1:] == (3, 32, 32) and ds.num_classes == 10
        assert ds.class_counts.tolist() == D.long_tail_counts(20, 10, 10)
        assert len(ds.test_y) == 40 and ds.class_names[3] == "c3"


def test_cifar100_loader_and_lt(tmp_path):
    write_fake_cifar(tmp_path, num_classes=100, per_class_train=10, per_class_test=1)
    ds = D.load_dataset("cifar100-lt", str(tmp_path), imbalance=10, seed=0)
    assert ds.num_classes == 100 and ds.class_names[99] == "f99"
    assert ds.class_counts.tolist() == D.long_tail_counts(10, 100, 10)
    assert len(ds.test_y) == 100


def test_cifar_pixel_layout(tmp_path):
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    folder = write_fake_cifar(tmp_path, num_classes=10, per_class_train=2, per_class_test=1)
    import pickle
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    tx, ty, *_ = D.load_cifar(10, str(tmp_path))
    first = np.asarray(raw[b"data"][0])
    assert tx[0, 1, 2, 3].item() == first[1024 + 2 * 32 + 3]
    assert ty[0].item() == raw[b"labels"][0]


def test_missing_fashion_says_where_and_how(tmp_path):
    with pytest.raises(D.DataNotFoundError) as e:
        D.load_dataset("fmnist-lt", str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install" in msg
    assert "dataset-fashion-mnist" in msg
    # one file missing: the message names it
    root = write_fake_fashion(tmp_path / "fm")
    os.remove(os.path.join(root, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(D.DataNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        D.load_dataset("fmnist-lt", root)


@pytest.mark.parametrize("name,folder", [("cifar10-lt", "cifar-10-batches-py"),
                                         ("cifar100-lt", "cifar-100-python")])
def test_missing_cifar_says_where_and_how(tmp_path, name, folder):
    with pytest.raises(D.DataNotFoundError) as e:
        D.load_dataset(name, str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and folder in msg and "cs.toronto.edu" in msg
    with pytest.raises(D.DataNotFoundError, match="--data-root"):
        D.load_dataset(name, None)


def test_stratified_limit_keeps_shares():
    labels = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    keep = D.stratified_limit(labels, 3, 20, seed=0)
    assert torch.bincount(labels[keep], minlength=3).tolist() == [16, 3, 1]


def test_augment_three_views():
    from rcl_train.augment import build_augment

    for name, shape in (("fmnist-lt", (1, 28, 28)), ("cifar10-lt", (3, 32, 32))):
        aug = build_augment(name, shape)
        x = torch.randint(0, 256, (5,) + shape, dtype=torch.uint8)
        views = aug(x)
        assert len(views) == 3
        for v in views:
            assert v.shape == (5,) + shape and v.dtype == torch.float32 and torch.isfinite(v).all()
        assert not torch.equal(views[1], views[2])
        assert aug.eval_view(x).shape == (5,) + shape


def test_models_shapes():
    from rcl_train.models import build_model

    for arch, c, hw in (("resnet8", 1, 28), ("resnet32", 3, 32)):
        m = build_model(arch, c, num_classes=7, feat_dim=16, hidden_dim=32)
        z, logits, centers = m(torch.randn(4, c, hw, hw))
        assert z.shape == (4, 16) and logits.shape == (4, 7) and centers.shape == (7, 16)
        torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
        torch.testing.assert_close(centers.norm(dim=1), torch.ones(7))
        assert logits.abs().max() <= 30.0 + 1e-4  # cosine classifier, scale 30
    n32 = sum(p.numel() for p in build_model("resnet32", 3, 10).encoder.parameters())
    assert 0.45e6 < n32 < 0.48e6  # ResNet-32 has about 0.46 M parameters


def test_metrics_groups_and_balanced_accuracy():
    assert [group_of(c) for c in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 0, 1, 0, 0, 0, 2, 2])
    m = compute_metrics(preds, labels, [500, 50, 5], ["a", "b", "c"])
    assert m["overall_accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert (m["many"], m["medium"], m["few"]) == (1.0, 0.5, 0.5)
    assert m["confusion_matrix"][2] == [2, 0, 2]
    m2 = compute_metrics(preds[:4], labels[:4], [500, 300, 200])
    assert m2["medium"] is None and m2["few"] is None and m2["per_class"][2]["accuracy"] is None


def test_warmup_cosine_schedule_follows_the_formula():
    """The LambdaLR gives, step after step, lr = base * (s+1)/w during the warm-up and then
    base/2 * (1 + cos(pi * (s-w)/(T-w))); resumed from its state_dict it continues the same."""
    base, total, warmup = 0.1, 100, 10
    formula = [base * (s + 1) / warmup if s < warmup
               else 0.5 * base * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
               for s in range(total)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_scheduler(opt, total, warmup)
    lrs = []
    for s in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        if s == 40:
            saved = (copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))
        opt.step()
        sched.step()
    assert lrs == pytest.approx(formula, rel=1e-12, abs=0)
    assert lrs[9] == pytest.approx(base) and lrs[55] == pytest.approx(base / 2) and lrs[99] < 1e-3
    # a fresh optimizer and scheduler loaded from step 40's state give the same lrs from there on
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched2 = build_scheduler(opt2, total, warmup)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    resumed = []
    for _ in range(40, total):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == lrs[40:]
    assert warmup_steps_used(10, 50) == 2  # warm-up capped at a fifth of the run
