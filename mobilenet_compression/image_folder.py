"""Image folders streamed from disk: `--dataset imagefolder` (and `imagenet`, its 1,000-class
name) with `--data_dir` holding `train/` and `val/`, one folder per class, as torchvision's
`ImageFolder` reads them (classes in sorted folder order, which for ImageNet's synset folders
is the order torchvision's pretrained weights expect).

Unlike the small datasets of data.py, nothing is held in memory but the file names: a
`DataLoader` with worker processes decodes each batch (resize, center crop: the eval
transforms of torchvision's weights) while the network runs, and the batch is normalised on
the device, as data.BatchLoader does for the in-memory sets.

Splits: `test` is `val/` (the split every published ImageNet figure is measured on); the
run's own validation images (for `--bias_correction auto` and QAT's checks) are held out of
`train/`, so calibration, bias correction, the clip search and QAT read training images
only. Every split is kept in a fixed class-balanced order (round robin over the classes, each
class shuffled with a fixed seed), so the first N images of a split, what `--max_eval_samples`
and the calibration batches take, cover the classes evenly.
"""

import math
import os
import time
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from .data import VALIDATION_SPLIT_SEED, DatasetInfo
from .errors import UserError

# Held out of train/ for the run's validation choices when the checkpoint does not say.
DEFAULT_VAL_SIZE = 5000


def default_workers():
    """Decoding processes: one per core this process may use."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes the network's input: resize the shorter side, center crop (or, for
    QAT, a random resized crop and flip), then normalise with mean and std (0..1 scale)."""
    input_size: int
    resize_size: int
    mean: tuple
    std: tuple
    interpolation: str = "bilinear"
    channels: int = 3

    def transform(self, augment):
        mode = transforms.InterpolationMode(self.interpolation)
        if augment:
            steps = [transforms.RandomResizedCrop(self.input_size, interpolation=mode,
                                                  antialias=True),
                     transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(self.resize_size, interpolation=mode, antialias=True),
                     transforms.CenterCrop(self.input_size)]
        return transforms.Compose(steps + [transforms.PILToTensor()])


class _Files(Dataset):
    """(uint8 image tensor, label, None) per file, or (None, label, 'path: reason') for a file
    that cannot be read, so that the loader can say which one in a sentence."""

    def __init__(self, samples, transform, channels):
        self.samples, self.transform = samples, transform
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert(self.mode)), label, None
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for a bad file
            return None, label, f"{path}: {e}"


def _collate(items):
    bad = [problem for _, _, problem in items if problem is not None]
    if bad:
        return None, None, bad
    return (torch.stack([x for x, _, _ in items]),
            torch.tensor([y for _, y, _ in items], dtype=torch.int64), None)


class FolderSplit:
    """A split of an image folder: file names and labels in a class-balanced order; the
    images are read when a loader iterates."""

    def __init__(self, samples, name, preprocess, device=None, workers=None):
        self.samples = samples
        self.name = name  # "train", "val" or "test": calibration asserts it reads "train" only
        self.preprocess = preprocess
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.workers = default_workers() if workers is None else workers
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)

    def __len__(self):
        return len(self.samples)

    def to(self, device):
        return FolderSplit(self.samples, self.name, self.preprocess, device, self.workers)

    def head(self, n):
        if n is None or n >= len(self):
            return self
        return FolderSplit(self.samples[:n], self.name, self.preprocess, self.device,
                           self.workers)

    def loader(self, info, batch_size, augment=False, seed=0, drop_last=False,
               channels_last=False, shuffle=None, **_):
        return FolderLoader(self, info, batch_size, augment, seed, drop_last, channels_last,
                            shuffle)


class FolderLoader:
    """data.BatchLoader's interface over a FolderSplit: batches of normalised float images
    on the split's device, the order (and QAT's augmentation) of epoch e drawn from a
    generator seeded with (seed, e). `wait_s`: the seconds the consumer has waited for decoded
    batches (about 0 when the workers keep up)."""

    def __init__(self, split, info, batch_size, augment=False, seed=0, drop_last=False,
                 channels_last=False, shuffle=None):
        self.split, self.batch_size, self.augment = split, batch_size, augment
        self.shuffle = augment if shuffle is None else shuffle
        self.seed, self.drop_last, self.channels_last = seed, drop_last, channels_last
        self.mean = torch.tensor(info.mean, device=split.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(info.std, device=split.device).view(1, -1, 1, 1) * 255
        self.files = _Files(split.samples, split.preprocess.transform(augment),
                            split.preprocess.channels)
        self.epoch = self.start_step = 0
        self.wait_s = 0.0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.split)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        order = order[self.start_step * self.batch_size:len(self) * self.batch_size]
        batches = DataLoader(self.files, self.batch_size, sampler=order.tolist(),
                             num_workers=self.split.workers, collate_fn=_collate, generator=g,
                             pin_memory=self.split.device.type == "cuda")
        batches = iter(batches)
        while True:
            t0 = time.perf_counter()
            x, y, bad = next(batches, (None, None, None))
            self.wait_s += time.perf_counter() - t0
            if bad:
                raise UserError(f"cannot read the image {bad[0]}; remove or replace it.")
            if y is None:
                break
            x = x.to(self.split.device, non_blocking=True)
            x = (x.float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.split.device)
        self.start_step = 0


def balanced_order(samples, seed):
    """`samples` in round-robin order over their classes, each class shuffled by `seed`:
    every prefix covers the classes as evenly as it can."""
    by_class = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    g = torch.Generator().manual_seed(seed)
    queues = [[items[i] for i in torch.randperm(len(items), generator=g).tolist()]
              for _, items in sorted(by_class.items())]
    longest = max(map(len, queues), default=0)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def _image_folder(root, what):
    try:
        return datasets.ImageFolder(root, allow_empty=False)
    except FileNotFoundError as e:
        raise UserError(f"{root} ({what}) {_reason(e)}; it needs one folder of images per "
                        f"class.") from None


def _reason(e):
    text = str(e)
    if "class folder" in text:
        return "has no class folders"
    if "No such file" in text or "not found" in text.lower():
        return "does not exist"
    return "holds a class folder with no images"


def load_image_folder(name, data_dir, preprocess, num_classes, val_size=None, workers=None):
    """(info, train, val, test) FolderSplits of `data_dir`/train and `data_dir`/val."""
    if not data_dir:
        raise UserError(f"--dataset {name} needs --data_dir, the folder that holds train/ and "
                        f"val/ with one folder per class.")
    train_set = _image_folder(os.path.join(data_dir, "train"), "the training images")
    test_set = _image_folder(os.path.join(data_dir, "val"), "the evaluation images")
    if test_set.classes != train_set.classes:
        raise UserError(f"{data_dir}/train and {data_dir}/val name different classes "
                        f"({len(train_set.classes)} and {len(test_set.classes)}); they must "
                        f"hold the same class folders.")
    if len(train_set.classes) != num_classes:
        raise UserError(f"{data_dir}/train has {len(train_set.classes)} class folders, but the "
                        f"model's classifier has {num_classes} classes.")
    samples = balanced_order(train_set.samples, VALIDATION_SPLIT_SEED)
    val_size = min(DEFAULT_VAL_SIZE, len(samples) // 10) if val_size is None else val_size
    if not 0 < val_size < len(samples):
        raise UserError(f"{data_dir}/train has {len(samples)} images: too few to hold "
                        f"{max(val_size, 1)} out for validation and train on the rest.")
    info = DatasetInfo(name, datasets.ImageFolder, num_classes, preprocess.channels,
                       preprocess.input_size, preprocess.mean, preprocess.std, True, val_size,
                       f"{data_dir}/train and {data_dir}/val")
    split = {"preprocess": preprocess, "workers": workers}
    return (info, FolderSplit(samples[val_size:], "train", **split),
            FolderSplit(samples[:val_size], "val", **split),
            FolderSplit(balanced_order(test_set.samples, VALIDATION_SPLIT_SEED), "test",
                        **split))


def preprocess_of(ckpt):
    """The Preprocess a state dict source's checkpoint dict carries."""
    p = ckpt["preprocess"]
    return Preprocess(p["input_size"], p["resize_size"], tuple(p["mean"]), tuple(p["std"]),
                      p.get("interpolation", "bilinear"), ckpt["in_channels"])

