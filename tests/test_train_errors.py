"""rcl-train's failures: a diverging run stops with an error and keeps its last good checkpoint;
corrupt input files and flags give an `rcl-train: error:` line naming the file, not a traceback."""

from __future__ import annotations

import gzip
import math
import os
import pickle

import numpy as np
import pytest
import torch
from train_fakes import tiny_args, write_fake_cifar, write_fake_fashion

from rcl_train import data as D
from rcl_train.cli import main
from rcl_train.config import parse_config
from rcl_train.losses import Objective
from rcl_train.errors import NonFiniteError
from rcl_train.train import Trainer


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return write_fake_fashion(tmp_path_factory.mktemp("fashion"), per_class_train=24, per_class_test=3)


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def poison_objective(monkeypatch, at_call: int, what: str):
    """Make the objective's `at_call`-th call (1-based) give a NaN loss or an infinite gradient."""
    real = Objective.__call__
    calls = []

    def call(self, logits, labels, features=None, centers=None):
        total, parts = real(self, logits, labels, features, centers)
        calls.append(1)
        if len(calls) == at_call:
            if what == "loss":
                total = total * math.nan
                parts["loss"] = total.detach()
            else:
                total = total + _InfGradient.apply(logits.sum() * 0)
        return total, parts

    monkeypatch.setattr(Objective, "__call__", call)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nonfinite_step_stops_and_keeps_the_checkpoint(fashion_root, tmp_path, monkeypatch,
                                                       capsys, what):
    common = ["--loss", "rcl", "--loss-backend", "reference", "--eval-every", "0"]
    assert main(tiny_args(fashion_root, tmp_path, *common, "--max-steps", "3")) == 0  # saved at step 3
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    capsys.readouterr()
    poison_objective(monkeypatch, at_call=2, what=what)  # global step 5 of the resumed run
    code = main(tiny_args(fashion_root, tmp_path, *common, "--resume", str(tmp_path)))
    assert code == 3
    err = capsys.readouterr().err
    assert f"rcl-train: error: non-finite {what} at step 5" in err, err
    assert "stopped before the optimizer step" in err and str(ckpt) in err
    assert ckpt.read_bytes() == before


def test_nonfinite_gradient_never_reaches_the_parameters(fashion_root, tmp_path, monkeypatch):
    poison_objective(monkeypatch, at_call=2, what="gradient")
    cfg = parse_config(tiny_args(fashion_root, tmp_path, "--loss", "bcl", "--loss-backend",
                                 "reference", "--eval-every", "0"))
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 2"):
        trainer.run()
    assert trainer.global_step == 1
    for name, value in trainer.model.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
    assert not os.path.exists(trainer.ckpt_path)  # no epoch finished: nothing was ever saved


def test_overflowing_parameters_are_never_saved(fashion_root, tmp_path, monkeypatch, capsys):
    """A finite loss and gradient can still overflow the parameters (a huge learning rate): the
    check before each save refuses such a model."""
    common = ["--loss", "bcl", "--loss-backend", "reference", "--eval-every", "0"]
    assert main(tiny_args(fashion_root, tmp_path, *common, "--max-steps", "3")) == 0
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    real_step = torch.optim.SGD.step
    calls = []

    def overflowing_step(self, *args, **kwargs):  # step 6, the last of epoch 1, overflows
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", overflowing_step)
    capsys.readouterr()
    assert main(tiny_args(fashion_root, tmp_path, *common, "--resume", str(tmp_path))) == 3
    err = capsys.readouterr().err
    assert "rcl-train: error: the model has non-finite parameters after step 6: not saved" in err
    assert ckpt.read_bytes() == before


# ------------------------------------------------------------------ corrupt inputs
def _rewrite_gz(path, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _truncate(path, keep: float = 0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _rewrite_pickle(path, edit):
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    edit(d)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def _fashion_label_10(root):
    path = os.path.join(root, "train-labels-idx1-ubyte.gz")
    labels = D.read_idx(path).copy()
    labels[5] = 10
    D.write_idx(path, labels)


FASHION_CASES = {
    # case: (file, corrupt(root, path), what the message says)
    "garbage_gz": ("train-images-idx3-ubyte.gz",
                   lambda root, p: open(p, "wb").write(b"this is not gzip data at all"),
                   "corrupt or truncated gzip"),
    "truncated_gz": ("t10k-images-idx3-ubyte.gz", lambda root, p: _truncate(p),
                     "corrupt or truncated gzip"),
    "truncated_idx_header": ("train-labels-idx1-ubyte.gz",
                             lambda root, p: _rewrite_gz(p, b"\x00\x00\x08\x03\x00\x00\x01"),
                             "truncated IDX header: 3 dimensions need 12 bytes, the file has 3"),
    "train_label_out_of_range": ("train-labels-idx1-ubyte.gz", lambda root, p: _fashion_label_10(root),
                                 "label 10 at position 5 is out of range 0..9"),
}


@pytest.mark.parametrize("case", FASHION_CASES)
def test_corrupt_fashion_file_is_a_clear_error(tmp_path, capsys, case):
    name, corrupt, needle = FASHION_CASES[case]
    root = write_fake_fashion(tmp_path / "fm", per_class_train=24, per_class_test=3)
    path = os.path.join(root, name)
    corrupt(root, path)
    assert main(tiny_args(root, tmp_path / "out", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rcl-train: error: {path}: ") and needle in err, err


def _relabel(root, split, old, new):
    path = os.path.join(root, f"{split}-labels-idx1-ubyte.gz")
    labels = D.read_idx(path).copy()
    labels[labels == old] = new
    D.write_idx(path, labels)


def _replace_test_set(root, images):
    D.write_idx(os.path.join(root, "t10k-images-idx3-ubyte.gz"), images)
    D.write_idx(os.path.join(root, "t10k-labels-idx1-ubyte.gz"), np.zeros(len(images), np.uint8))


DATA_SET_CASES = {
    # a class without training images reached the losses as a count of 0, naming no class
    "class_missing_from_training": (lambda root: _relabel(root, "train", 3, 2),
                                    "the training set has no image of class 3 (Dress); every "
                                    "class needs at least one"),
    # these trained and exited 0
    "empty_test_set": (lambda root: _replace_test_set(root, np.zeros((0, 28, 28), np.uint8)),
                       "the test set is empty"),
    "test_images_of_another_size": (lambda root: _replace_test_set(root, np.zeros((5, 32, 32), np.uint8)),
                                    "test images are [1, 32, 32] (channels, height, width) but "
                                    "training images are [1, 28, 28]"),
}


@pytest.mark.parametrize("case", DATA_SET_CASES)
def test_unusable_data_set_is_a_clear_error(tmp_path, capsys, case):
    corrupt, needle = DATA_SET_CASES[case]
    root = write_fake_fashion(tmp_path / "fm", per_class_train=24, per_class_test=3)
    corrupt(root)
    assert main(tiny_args(root, tmp_path / "out", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert err == f"rcl-train: error: fmnist-lt in {root}: {needle}\n", err


CIFAR_CASES = {
    "truncated_pickle": ("train", lambda p: _truncate(p), "not a readable CIFAR python pickle"),
    "missing_key": ("train", lambda p: _rewrite_pickle(p, lambda d: d.pop(b"fine_labels")),
                    "no 'fine_labels' entry"),
    "train_label_out_of_range": ("train",
                                 lambda p: _rewrite_pickle(p, lambda d: d[b"fine_labels"].__setitem__(3, 100)),
                                 "label 100 at position 3 is out of range 0..99"),
    "wrong_image_size": ("test", lambda p: _rewrite_pickle(p, lambda d: d.__setitem__(b"data", d[b"data"][:, :3000])),
                         "'data': expected data [n, 3072]"),
    # pixels that are not uint8 were converted: [0, 1] floats became black images, 300 wrapped to 44
    "float_pixels": ("train", lambda p: _rewrite_pickle(
        p, lambda d: d.__setitem__(b"data", d[b"data"].astype("float32") / 255)),
        "'data': expected uint8 pixels 0..255, got dtype float32"),
    "pixels_above_255": ("test", lambda p: _rewrite_pickle(
        p, lambda d: d.__setitem__(b"data", d[b"data"].astype("int64") + 300)),
        "'data': expected uint8 pixels 0..255, got dtype int64"),
    "pixels_as_a_list": ("test", lambda p: _rewrite_pickle(
        p, lambda d: d.__setitem__(b"data", d[b"data"].tolist())),
        "'data': expected a NumPy array of uint8 pixels, got list"),
    # labels that are not integers were truncated (96.7 -> 96) or crashed the conversion
    "float_label": ("train", lambda p: _rewrite_pickle(p, lambda d: d[b"fine_labels"].__setitem__(3, 96.7)),
                    "'fine_labels': label at position 3 is 96.7 (float); expected an integer 0..99"),
    "labels_none": ("train", lambda p: _rewrite_pickle(p, lambda d: d.__setitem__(b"fine_labels", None)),
                    "'fine_labels': expected a list of integer labels, got NoneType"),
    "labels_as_strings": ("test", lambda p: _rewrite_pickle(
        p, lambda d: d.__setitem__(b"fine_labels", [str(v) for v in d[b"fine_labels"]])),
        "'fine_labels': label at position 0 is '"),
    "huge_label": ("train", lambda p: _rewrite_pickle(p, lambda d: d[b"fine_labels"].__setitem__(7, 2**70)),
                   f"'fine_labels': label {2**70} at position 7 is out of range 0..99"),
    "float_label_array": ("train", lambda p: _rewrite_pickle(
        p, lambda d: d.__setitem__(b"fine_labels", np.array(d[b"fine_labels"], dtype=float))),
        "'fine_labels': expected a 1-D array of integer labels, got dtype float64"),
    "class_names_none": ("meta", lambda p: _rewrite_pickle(p, lambda d: d.__setitem__(b"fine_label_names", None)),
                         "'fine_label_names': expected a list of class names"),
}


@pytest.mark.parametrize("case", CIFAR_CASES)
def test_corrupt_cifar_file_is_a_clear_error(tmp_path, capsys, case):
    name, corrupt, needle = CIFAR_CASES[case]
    folder = write_fake_cifar(tmp_path / "data", num_classes=100, per_class_train=4, per_class_test=1)
    path = os.path.join(folder, name)
    corrupt(path)
    assert main(["--dataset", "cifar100-lt", "--data-root", str(tmp_path / "data"), "--arch", "resnet8",
                 "--max-steps", "1", "--device", "cpu", "--no-progress", "--no-plots",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rcl-train: error: {path}: ") and needle in err, err


class _RunsACommand:
    """Pickles as a call of os.system: what a hostile data file would hold."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("name", ["meta", "train"])
def test_cifar_pickle_cannot_run_code(tmp_path, capsys, name):
    folder = write_fake_cifar(tmp_path / "data", num_classes=100, per_class_train=4, per_class_test=1)
    marker = tmp_path / "marker"
    path = os.path.join(folder, name)
    _rewrite_pickle(path, lambda d: d.__setitem__(b"extra", _RunsACommand(f"touch {marker}")))
    assert main(["--dataset", "cifar100-lt", "--data-root", str(tmp_path / "data"), "--arch", "resnet8",
                 "--max-steps", "1", "--device", "cpu", "--no-progress", "--no-plots",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.startswith(f"rcl-train: error: {path}: refused: the pickle names ") and "system" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cifar_unpickler_reads_numpy_1_and_2_arrays():
    """The real CIFAR files were written by NumPy 1 (numpy.core.multiarray); files written by
    NumPy 2 name numpy._core.multiarray: both load, as do Python 3 bytes and NumPy scalars."""
    import io
    import pickletools

    value = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, np.int64(2)],
             b"name": b"batch"}
    blob = pickle.dumps(value, protocol=2)
    names = {arg for op, arg, _ in pickletools.genops(blob) if op.name == "GLOBAL"}
    modern = next(n for n in names if n.endswith("multiarray _reconstruct")).split()[0]
    legacy = "numpy.core.multiarray" if modern == "numpy._core.multiarray" else "numpy._core.multiarray"
    for module in (modern, legacy):
        got = D.CifarUnpickler(io.BytesIO(blob.replace(modern.encode(), module.encode())),
                               encoding="bytes").load()
        np.testing.assert_array_equal(got[b"data"], value[b"data"])
        assert got[b"labels"] == [1, 2] and got[b"name"] == b"batch"


def _drop_a_weight(path):
    ck = torch.load(path, weights_only=True)
    ck["model"].pop("fc.weight")
    torch.save(ck, path)


def _edit(edit):
    """A corruption that loads: the checkpoint re-saved with one field changed by `edit`."""
    def corrupt(path):
        ck = torch.load(path, weights_only=True)
        edit(ck)
        torch.save(ck, path)
    return corrupt


def _flip_a_weight_byte(path):
    """One bit of a stored weight flipped in place: torch.load reads it as a changed weight."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)  # the largest weight's storage
    data = bytearray(open(path, "rb").read())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len
    data[start + member.file_size // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


RESUME_CASES = {  # case: (corrupt(path), what the message says after the path)
    "empty": (lambda p: open(p, "wb").close(), " is not a readable rcl-train checkpoint (EOFError)"),
    "truncated": (_truncate, " is not a readable rcl-train checkpoint"),
    "foreign_state_dict": (lambda p: torch.save({"weight": torch.ones(3)}, p),
                           " is not an rcl-train checkpoint (no config, model,"),
    # a pickled class is code: weights_only refuses to load it rather than run it
    "foreign_pickle": (lambda p: pickle.dump(Objective, open(p, "wb"), protocol=2),
                       " is not a readable rcl-train checkpoint (UnpicklingError"),
    "model_does_not_fit": (_drop_a_weight, ": the saved model or optimizer does not fit this run"),
    # these loaded and resumed (a flipped byte), or gave a traceback or a wrong message
    "flipped_byte": (_flip_a_weight_byte, " is damaged: the CRC-32 of "),
    "config_a_list": (_edit(lambda ck: ck.__setitem__("config", [1, 2])),
                      ": field 'config': expected a dict, got list [1, 2]"),
    "history_an_int": (_edit(lambda ck: ck.__setitem__("history", 3)),
                       ": field 'history': expected a list of per-epoch dicts, got int 3"),
    "epoch_a_string": (_edit(lambda ck: ck.__setitem__("epoch", "0")),
                       ": field 'epoch': expected an integer >= 0, got str '0'"),
    "batch_negative": (_edit(lambda ck: ck.__setitem__("batch", -1)),
                       ": field 'batch': expected an integer >= 0, got int -1"),
    "step_off_the_schedule": (_edit(lambda ck: ck.__setitem__("global_step", 4)),
                              ": field 'epoch', 'batch' or 'global_step': epoch 0, batch 3, step 4 "
                              "is no position of this run (2 epochs of 6 steps)"),
    "rng_missing_a_key": (_edit(lambda ck: ck["rng"].pop("numpy")), ": field 'rng': no numpy state"),
    "rng_of_the_wrong_type": (_edit(lambda ck: ck["rng"].__setitem__("torch", torch.zeros(3))),
                              ": field 'rng': not a random-generator state"),
    "rng_not_a_dict": (_edit(lambda ck: ck.__setitem__("rng", 5)),
                       ": field 'rng': expected a dict with python, numpy, torch, got int 5"),
    "wall_time_not_a_number": (_edit(lambda ck: ck.__setitem__("wall_time", "1.5")),
                               ": field 'wall_time': expected a finite number of seconds >= 0"),
    "nan_weights": (_edit(lambda ck: ck["model"]["fc.weight"].fill_(math.nan)),
                    ": field 'model': fc.weight holds non-finite values (NaN or inf); rcl-train "
                    "never saves such a model"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_bad_checkpoint_to_resume_is_a_clear_error(fashion_root, tmp_path, capsys, case):
    assert main(tiny_args(fashion_root, tmp_path, "--loss", "bcl", "--loss-backend", "reference",
                          "--max-steps", "3", "--eval-every", "0")) == 0
    ckpt = tmp_path / "checkpoint.pt"
    corrupt, needle = RESUME_CASES[case]
    corrupt(ckpt)
    capsys.readouterr()
    assert main(tiny_args(fashion_root, tmp_path, "--loss", "bcl", "--loss-backend", "reference",
                          "--resume", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rcl-train: error: --resume: {ckpt}{needle}"), err
    assert "--lr" not in err and err.count("\n") == 1


@pytest.mark.parametrize("error", ["ENOSPC", "torch_writer"])
def test_full_disk_while_saving_keeps_the_last_checkpoint(fashion_root, tmp_path, monkeypatch,
                                                          capsys, error):
    """torch.save raises OSError(ENOSPC), or its zip writer's RuntimeError (no errno) on a
    device with no space left: one error line that says so, the temporary file removed, the
    last good checkpoint kept."""
    import errno
    import shutil
    from collections import namedtuple

    common = ["--loss", "bcl", "--loss-backend", "reference", "--eval-every", "0"]
    assert main(tiny_args(fashion_root, tmp_path, *common, "--max-steps", "6")) == 0
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        open(f, "wb").write(b"the part written before the disk filled up")
        if error == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4176")

    monkeypatch.setattr(torch, "save", failing_save)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
    capsys.readouterr()
    assert main(tiny_args(fashion_root, tmp_path, *common, "--resume", str(tmp_path))) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rcl-train: error: cannot write the checkpoint {ckpt}: the disk is full"), err
    assert (f"The last checkpoint, {ckpt} (step 6), is kept: resume with the same flags and "
            f"--resume {tmp_path}.") in err and err.count("\n") == 1
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert ckpt.read_bytes() == before


def test_ctrl_c_says_where_the_checkpoint_is(fashion_root, tmp_path, monkeypatch, capsys):
    common = ["--loss", "bcl", "--loss-backend", "reference", "--eval-every", "0"]
    real_step = Trainer.train_step
    calls = []

    def interrupted_step(self, idx):
        calls.append(1)
        if len(calls) == 8:  # in epoch 2, after the checkpoint of step 6
            raise KeyboardInterrupt
        return real_step(self, idx)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    assert main(tiny_args(fashion_root, tmp_path, *common)) == 130
    err = capsys.readouterr().err
    ckpt = tmp_path / "checkpoint.pt"
    assert err == (f"rcl-train: error: interrupted at step 7. The last checkpoint, {ckpt} (step 6), "
                   f"is kept: resume with the same flags and --resume {tmp_path}.\n"), err
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(tiny_args(fashion_root, tmp_path, *common, "--resume", str(tmp_path))) == 0


def _read_only(monkeypatch, path):
    """`path` made read-only; root writes through file modes, so there the probe write fails
    as it would (PermissionError) instead."""
    import errno
    import tempfile

    os.makedirs(path)
    os.chmod(path, 0o555)
    if os.geteuid() == 0:
        def refuse(*args, dir=None, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)


OUT_CASES = {  # case: (make the bad --out(tmp_path, monkeypatch) -> path, message after the path)
    "an_existing_file": (lambda t, m: (t / "f").write_text("x") and str(t / "f"),
                         ": an existing file, not a directory"),
    "under_a_file": (lambda t, m: (t / "f").write_text("x") and str(t / "f" / "run"),
                     f": lies under {{t}}/f, which is a file, not a directory"),
    "read_only": (lambda t, m: _read_only(m, t / "ro") or str(t / "ro"),
                  ": cannot write there (PermissionError"),
}


@pytest.mark.parametrize("case", OUT_CASES)
def test_unusable_out_is_a_clear_error(fashion_root, tmp_path, monkeypatch, capsys, case):
    make, needle = OUT_CASES[case]
    out = make(tmp_path, monkeypatch)
    assert main(tiny_args(fashion_root, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rcl-train: error: --out {out}{needle.format(t=tmp_path)}"), err


def test_unknown_compile_backend_is_a_clear_error(fashion_root, tmp_path, capsys):
    assert main(tiny_args(fashion_root, tmp_path, "--compile", "nosuch", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcl-train: error: --compile nosuch: not a torch.compile backend here "
                          "(available: ") and "inductor" in err, err


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:", "cpu:0x", "cudax"])
def test_malformed_device_is_a_flag_error(capsys, device):
    with pytest.raises(SystemExit) as e:
        parse_config(["--device", device])
    assert e.value.code == 2
    assert f"argument --device: expected auto, cpu, cuda or cuda:N, got {device!r}" in capsys.readouterr().err
