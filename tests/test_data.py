"""The real torchvision loaders on data in the real on-disk formats, and the batch loader."""

import gzip
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets

from mobilenet_compression.data import (
    DEBIAN_FASHION_MNIST,
    BatchLoader,
    dataset_info,
    load_dataset,
)
from mobilenet_compression.errors import UserError
from tests.cifar_format import checksums_for, write_cifar


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch):
    root = str(tmp_path / "data")
    written = write_cifar(root, "cifar10", n_train=120, n_test=40)
    # The only substitution: torchvision's MD5 table, pointed at the generated files.
    train, test, meta = checksums_for(root, "cifar10")
    monkeypatch.setattr(datasets.CIFAR10, "train_list", train)
    monkeypatch.setattr(datasets.CIFAR10, "test_list", test)
    monkeypatch.setattr(datasets.CIFAR10, "meta", meta)
    return root, written


def test_cifar10_loader_reads_the_pickles_pixel_exactly(cifar10_dir):
    root, (train_x, train_y, test_x, test_y) = cifar10_dir
    info, train, val, test = load_dataset("cifar10", root, val_size=20)
    assert (info.num_classes, info.in_channels, info.input_size) == (10, 3, 32)
    assert train.images.dtype == torch.uint8 and train.images.shape == (100, 3, 32, 32)
    assert len(val) == 20 and len(test) == 40
    # Train and val together are exactly the official training set, nothing lost or repeated.
    both = torch.cat([train.images, val.images]).permute(0, 2, 3, 1).reshape(120, -1).numpy()
    assert sorted(map(bytes, both)) == sorted(map(bytes, train_x.reshape(120, -1)))
    assert np.array_equal(test.images.permute(0, 2, 3, 1).numpy(), test_x)
    assert np.array_equal(test.labels.numpy(), test_y)


def test_validation_split_is_deterministic_and_disjoint(cifar10_dir):
    root, _ = cifar10_dir
    _, train_a, val_a, _ = load_dataset("cifar10", root, val_size=30)
    _, train_b, val_b, _ = load_dataset("cifar10", root, val_size=30)
    assert torch.equal(val_a.images, val_b.images) and torch.equal(train_a.images, train_b.images)
    train_rows = {bytes(r) for r in train_a.images.reshape(len(train_a), -1).numpy()}
    assert not any(bytes(r) in train_rows for r in val_a.images.reshape(30, -1).numpy())


def test_cifar100_loader(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_cifar(root, "cifar100", n_train=60, n_test=20)
    train, test, meta = checksums_for(root, "cifar100")
    monkeypatch.setattr(datasets.CIFAR100, "train_list", train)
    monkeypatch.setattr(datasets.CIFAR100, "test_list", test)
    monkeypatch.setattr(datasets.CIFAR100, "meta", meta)
    info, train_s, val, test_s = load_dataset("cifar100", root, val_size=10)
    assert info.num_classes == 100 and len(train_s) == 50 and len(test_s) == 20


def test_real_fashion_mnist_from_debian_package(tmp_path):
    info, train, val, test = load_dataset("fashion-mnist", str(tmp_path))
    assert train.images.shape[1:] == (1, 28, 28) and len(train) + len(val) == 60000
    assert len(test) == 10000 and set(test.labels.unique().tolist()) == set(range(10))
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


STAGE_AT_ONCE = """
import os, sys, time
from mobilenet_compression import data
data_dir, ready, go = sys.argv[1:]
open(ready, "w").close()
while not os.path.exists(go):  # every process has imported torch: start together
    time.sleep(0.001)
info, train, val, test = data.load_dataset("fashion-mnist", data_dir)
print(len(train) + len(val), len(test))
"""


def test_processes_staging_fashion_mnist_at_once_all_succeed(tmp_path):
    """K runs of a sweep starting together in a fresh directory all stage the dataset at once;
    with one shared `.part` name one of them died with FileNotFoundError on the rename."""
    if not os.path.isdir(DEBIAN_FASHION_MNIST):
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    data_dir, go = tmp_path / "data", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", STAGE_AT_ONCE, str(data_dir), str(r),
                               str(go)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert out.split() == ["60000", "10000"]
    raw = data_dir / "FashionMNIST" / "raw"
    names = sorted(name[:-3] for name, _ in datasets.FashionMNIST.resources)
    assert sorted(os.listdir(raw)) == names  # no temporary file left behind
    for name in names:  # each file whole: the bytes of Debian's file, unpacked
        with gzip.open(os.path.join(DEBIAN_FASHION_MNIST, name + ".gz"), "rb") as f:
            want = hashlib.sha256(f.read()).hexdigest()
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == want, name


def test_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="unknown dataset"):
        dataset_info("imagenet")


def test_batch_loader_augments_on_device_and_resumes_mid_epoch(cifar10_dir):
    root, _ = cifar10_dir
    info, train, _, _ = load_dataset("cifar10", root, val_size=20)
    loader = BatchLoader(train, info, batch_size=16, augment=True, seed=42)
    loader.set_epoch(3)
    full = list(loader)
    assert len(full) == len(loader) == 7
    loader.set_epoch(3, start_step=4)
    tail = list(loader)
    assert len(tail) == 3
    for (xa, ya), (xb, yb) in zip(full[4:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader.set_epoch(4)
    assert not torch.equal(next(iter(loader))[0], full[0][0])  # a new epoch, new order/crops
    # Without augmentation the batches are the normalised images themselves, in order.
    plain = BatchLoader(train, info, batch_size=100)
    x, y = next(iter(plain))
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (train.images.float() / 255 - mean) / std, atol=1e-5)


def test_random_crop_is_a_shifted_window_of_the_padded_image(cifar10_dir):
    root, _ = cifar10_dir
    info, train, _, _ = load_dataset("cifar10", root, val_size=20)
    loader = BatchLoader(train, info, batch_size=100, augment=True, seed=1)
    order, dx, dy, flip = loader._epoch_plan()
    x, _ = next(iter(loader))
    raw = torch.round(x * torch.tensor(info.std).view(1, 3, 1, 1) * 255
                      + torch.tensor(info.mean).view(1, 3, 1, 1) * 255)
    padded = torch.nn.functional.pad(train.images, (4,) * 4).float()
    for k in range(5):
        want = padded[order[k], :, dy[k]:dy[k] + 32, dx[k]:dx[k] + 32]
        if flip[k]:
            want = want.flip(2)
        assert torch.equal(raw[k], want)


def test_batch_loader_shuffles_without_augmenting(cifar10_dir):
    """train.py --augment none: each epoch a new order of the images themselves."""
    root, _ = cifar10_dir
    info, train, _, _ = load_dataset("cifar10", root, val_size=20)
    loader = BatchLoader(train, info, batch_size=len(train), shuffle=True, seed=3)
    plain = BatchLoader(train, info, batch_size=len(train))
    (x0, y0), = list(loader)
    (xp, yp), = list(plain)
    loader.set_epoch(1)
    (x1, _), = list(loader)
    assert not torch.equal(y0, yp) and sorted(y0.tolist()) == sorted(yp.tolist())
    # the same images, only reordered: every shuffled image is one of the plain ones
    flat_p = {tuple(v.tolist()) for v in xp.flatten(1)[:, :64]}
    assert all(tuple(v.tolist()) in flat_p for v in x0.flatten(1)[:, :64])
    assert not torch.equal(x0, x1)
