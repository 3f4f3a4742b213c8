"""Datasets as uint8 tensors on the training device, augmented there in whole batches.

The files are read by torchvision's own dataset classes (their download and checksum code);
after that every image lives in one uint8 tensor (N, C, H, W) and a batch is cropped, flipped
and normalised with a few tensor ops (the airbench idea in shared/STYLE.md): no per-image
Python or PIL work in the training loop.
"""

import gzip
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import datasets

from .errors import UserError
from .files import atomic_write

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# The validation split is drawn with its own fixed seed, so changing --seed changes the
# training run but never which images are held out.
VALIDATION_SPLIT_SEED = 20240601


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_class: type
    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple
    std: tuple
    flip: bool  # horizontal flips make sense for natural images and clothes alike
    val_size: int
    files_hint: str


DATASETS = {
    "cifar10": DatasetInfo(
        "cifar10", datasets.CIFAR10, 10, 3, 32,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, 5000,
        "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) "
        "or its extracted folder cifar-10-batches-py/",
    ),
    "cifar100": DatasetInfo(
        "cifar100", datasets.CIFAR100, 100, 3, 32,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True, 5000,
        "cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) "
        "or its extracted folder cifar-100-python/",
    ),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", datasets.FashionMNIST, 10, 1, 28,
        (0.2860,), (0.3530,), True, 5000,
        "the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in FashionMNIST/raw/ "
        "(or `apt-get install dataset-fashion-mnist`)",
    ),
}


def dataset_info(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return DATASETS[name]


@dataclass
class Split:
    """A labelled image set: uint8 images (N, C, H, W), int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str  # "train", "val" or "test": calibration asserts it reads "train" only

    def __len__(self):
        return len(self.labels)

    def to(self, device):
        return Split(self.images.to(device), self.labels.to(device), self.name)

    @property
    def device(self):
        return self.images.device

    def head(self, n):
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n], self.name)

    def loader(self, info, batch_size, **options):
        """Batches of normalised images (BatchLoader's options); image_folder.FolderSplit has
        the same method."""
        return BatchLoader(self, info, batch_size, **options)


def _stage_fashion_mnist(data_dir):
    """Unpack Debian's Fashion-MNIST files into torchvision's layout if --data_dir lacks
    them. Debian recompressed the .gz files (their MD5 differs from torchvision's table), so
    they are unpacked to the raw idx files, which torchvision reads and checks for its magic
    numbers; the network is never touched.

    Any number of processes may stage into the same folder at once (K runs of a sweep starting
    together): each unpacks into its own temporary file and renames it into place, so a file
    under its final name is always whole, and the last rename of identical bytes wins."""
    raw = os.path.join(data_dir, "FashionMNIST", "raw")
    names = [name for name, _ in datasets.FashionMNIST.resources]
    if all(os.path.exists(os.path.join(raw, n[:-3])) for n in names):
        return
    if not all(os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, n)) for n in names):
        return
    os.makedirs(raw, exist_ok=True)
    for n in names:
        target = os.path.join(raw, n[:-3])
        if os.path.exists(target):
            continue
        with gzip.open(os.path.join(DEBIAN_FASHION_MNIST, n), "rb") as src:
            atomic_write(target, lambda dst: shutil.copyfileobj(src, dst))


def _torchvision_dataset(info, data_dir, train):
    """Open the dataset with torchvision's class: files already there (checksums verified),
    else torchvision's own download. Any failure becomes one sentence naming the files."""
    cls = info.torchvision_class
    try:
        return cls(data_dir, train=train, download=False)
    except RuntimeError:
        pass  # not there (or failed its checksum): let torchvision fetch and verify it
    try:
        return cls(data_dir, train=train, download=True)
    except Exception as e:  # URLError, checksum RuntimeError, tar errors: all mean the same
        raise UserError(
            f"{info.name} is not in {data_dir} and could not be downloaded ({type(e).__name__}); "
            f"put {info.files_hint} in {data_dir} and run again."
        ) from None


def _as_nchw_uint8(data):
    array = np.asarray(data)
    if array.ndim == 3:  # (N, H, W) grayscale
        array = array[:, None]
    else:  # (N, H, W, C)
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))


def load_dataset(name, data_dir, val_size=None):
    """Return (info, train, val, test) Splits on the CPU. `val` is a deterministic held-out
    part of the official training set; `test` is the official test set."""
    info = dataset_info(name)
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data directory {data_dir}: {e.strerror}.") from None
    if name == "fashion-mnist":
        _stage_fashion_mnist(data_dir)
    train_set = _torchvision_dataset(info, data_dir, train=True)
    test_set = _torchvision_dataset(info, data_dir, train=False)

    images = _as_nchw_uint8(train_set.data)
    labels = torch.as_tensor(np.asarray(train_set.targets), dtype=torch.int64)
    val_size = info.val_size if val_size is None else val_size
    if not 0 < val_size < len(labels):
        raise UserError(f"--val_size must be between 1 and {len(labels) - 1}, got {val_size}.")
    order = torch.randperm(
        len(labels), generator=torch.Generator().manual_seed(VALIDATION_SPLIT_SEED)
    )
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    train = Split(images[train_idx], labels[train_idx], "train")
    val = Split(images[val_idx], labels[val_idx], "val")
    test = Split(
        _as_nchw_uint8(test_set.data),
        torch.as_tensor(np.asarray(test_set.targets), dtype=torch.int64),
        "test",
    )
    return info, train, val, test


class BatchLoader:
    """Iterates over a Split that already lives on the device, in batches of normalised
    float images. With `augment`, each image is randomly cropped from a 4-pixel zero-padded
    copy and (if the dataset allows) flipped, all as batched tensor ops. `shuffle` (default:
    the same as `augment`) draws a new order each epoch; without either, batches come in order.

    The order and the augmentation of epoch e come from a generator seeded with (seed, e),
    drawn in full when the epoch starts, so batch k of an epoch is the same whether the epoch
    runs whole or resumes at step k.
    """

    def __init__(self, split, info, batch_size, augment=False, seed=0, drop_last=False,
                 channels_last=False, pad=4, shuffle=None):
        self.split = split
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = augment if shuffle is None else shuffle
        self.flip = augment and info.flip
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.pad = pad
        device = split.images.device
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1) * 255
        self.epoch = 0
        self.start_step = 0
        self._padded = F.pad(split.images, (pad,) * 4) if augment else None

    def set_epoch(self, epoch, start_step=0):
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self):
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _epoch_plan(self):
        n = len(self.split)
        if not self.augment and not self.shuffle:
            return torch.arange(n), None, None, None
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g)
        if not self.augment:
            return order, None, None, None
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5 if self.flip else None
        return order, dx, dy, flip

    def _crop(self, idx, dx, dy):
        _, c, h, w = self.split.images.shape
        dev = self._padded.device
        rows = (dy.to(dev)[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        chans = torch.arange(c, device=dev)[None, :, None, None]
        return self._padded[idx[:, None, None, None], chans, rows, cols]

    def __iter__(self):
        order, dx, dy, flip = self._epoch_plan()
        dev = self.split.images.device
        for step in range(self.start_step, len(self)):
            sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
            idx = order[sl].to(dev)
            if self.augment:
                x = self._crop(idx, dx[sl], dy[sl])
                if flip is not None:
                    f = flip[sl].to(dev)[:, None, None, None]
                    x = torch.where(f, x.flip(3), x)
            else:
                x = self.split.images[idx]
            x = (x.float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.split.labels[idx]
        self.start_step = 0
