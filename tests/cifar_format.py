"""Write small CIFAR-10/100 datasets in the real on-disk format (python pickles), so the
real torchvision loader can be exercised here, where the real files cannot be downloaded."""

import hashlib
import os
import pickle

import numpy as np
from torchvision import datasets


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def write_cifar(root, name="cifar10", n_train=100, n_test=50, seed=0):
    """Write `name` under `root` in torchvision's layout; return (train_images NHWC,
    train_labels, test_images, test_labels) as written."""
    rng = np.random.default_rng(seed)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    num_classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    folder = os.path.join(root, cls.base_folder)
    os.makedirs(folder, exist_ok=True)
    written = {}
    splits = {"train": cls.train_list, "test": cls.test_list}
    sizes = {"train": n_train, "test": n_test}
    for split, files in splits.items():
        chunks = np.array_split(np.arange(sizes[split]), len(files))
        images, labels = [], []
        for (filename, _), idx in zip(files, chunks):
            # Rows are 3072 bytes: the red plane, then green, then blue, as in the real files.
            data = rng.integers(0, 256, size=(len(idx), 3072), dtype=np.uint8)
            y = rng.integers(0, num_classes, size=len(idx)).tolist()
            with open(os.path.join(folder, filename), "wb") as f:
                pickle.dump({"data": data, label_key: y, "batch_label": split}, f)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += y
        written[split] = (np.concatenate(images), np.array(labels))
    meta_names = [f"class_{i}" for i in range(num_classes)]
    with open(os.path.join(folder, cls.meta["filename"]), "wb") as f:
        pickle.dump({cls.meta["key"]: meta_names}, f)
    return written["train"] + written["test"]


def checksums_for(root, name="cifar10"):
    """The (train_list, test_list, meta) checksum tables of the files just written: torchvision
    verifies every CIFAR file against a hard-coded MD5, which generated files cannot match."""
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = os.path.join(root, cls.base_folder)
    train = [[f, _md5(os.path.join(folder, f))] for f, _ in cls.train_list]
    test = [[f, _md5(os.path.join(folder, f))] for f, _ in cls.test_list]
    meta = dict(cls.meta, md5=_md5(os.path.join(folder, cls.meta["filename"])))
    return train, test, meta
