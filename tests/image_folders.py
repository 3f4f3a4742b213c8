"""Image folders in the on-disk layout users have (root/train/<class>/<file>, root/val/...),
written by the tests: Fashion-MNIST from Debian's real files as PNGs, and generated JPEGs of
several sizes."""

import gzip
import os

import numpy as np
import torch
from PIL import Image

from mobilenet_compression.data import DEBIAN_FASHION_MNIST


def read_idx(path):
    """A gzipped idx file (the MNIST format) as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_fashion_mnist_pngs(root, n_train, n_test):
    """The first `n_train` training and `n_test` test images of Debian's Fashion-MNIST as
    grayscale PNGs, root/train/<label>/<index>.png and root/val/<label>/<index>.png, the index
    being the image's place in the original file."""
    for split, prefix, n in (("train", "train", n_train), ("val", "t10k", n_test)):
        images = read_idx(os.path.join(DEBIAN_FASHION_MNIST, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(DEBIAN_FASHION_MNIST, f"{prefix}-labels-idx1-ubyte.gz"))
        for label in range(10):
            os.makedirs(os.path.join(root, split, f"{label}"), exist_ok=True)
        for i in range(n):
            Image.fromarray(images[i]).save(os.path.join(root, split, f"{labels[i]}",
                                                         f"{i:05d}.png"))
    return root


def write_jpeg_folder(root, classes, n_train, n_val, seed=0):
    """Generated RGB JPEGs of random sizes (24 to 160 pixels a side, not square), each class
    its own mean colour so that a network can tell them apart."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c:04d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(24, 160, 2)
                colour = np.array([(c * 53) % 256, (c * 97) % 256, (c * 31) % 256])
                pixels = np.clip(colour + rng.normal(0, 40, (h, w, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(
                    os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def save_torchvision_state_dict(path, **kwargs):
    """A `torchvision.models.mobilenet_v2(weights=None, **kwargs)` state dict, saved as
    torchvision's own files are (torch.save of the state dict)."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    torch.save(mobilenet_v2(weights=None, **kwargs).state_dict(), path)
    return path
