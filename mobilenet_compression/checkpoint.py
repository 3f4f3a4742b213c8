"""Checkpoints: atomic writes, safe loads (weights_only=True) and self-describing metadata.

A checkpoint is a plain dict of tensors and Python numbers/strings:
  format, arch, dataset, num_classes, in_channels, input_size, width_multiplier, seed,
  epoch (epochs completed), train_acc, val_acc, best_val_acc, test_acc (best.pt, at the end),
  args (the training command's arguments), model (the state dict);
last.pt adds optimizer, scheduler, rng and the position inside an interrupted epoch.
Later commands need only the checkpoint's path: the model is rebuilt from the metadata.
"""

import hashlib
import os
import warnings

import torch

from .errors import UserError
from .files import atomic_write
from .model import build_model

FORMAT = "mobilenet-compression/checkpoint-v1"
METADATA_KEYS = (
    "arch", "dataset", "num_classes", "in_channels", "input_size", "width_multiplier", "seed",
)


def atomic_save(obj, path):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location="cpu"):
    """Load and check a checkpoint; every way it can be wrong is one UserError sentence."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; train one with `python train.py`.")
    return check_checkpoint(read_torch_file(path, map_location), path)


def read_torch_file(path, map_location="cpu"):
    """torch.load(weights_only=True) of a file that exists; a file torch cannot read is one
    UserError sentence."""
    try:
        with warnings.catch_warnings():
            # A damaged file can look like a legacy pickle: torch then warns about its protocol
            # before failing, which would be a second line beside the one error below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle/EOF errors all mean "not a readable checkpoint"
        raise UserError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(e).__name__}); "
            f"use another checkpoint or train again."
        ) from None


def check_checkpoint(ckpt, path):
    """`ckpt` (what `path` holds) if it is a checkpoint of train.py with all its metadata;
    else one UserError sentence."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise UserError(
            f"{path} is not a mobilenet-compression checkpoint (no {FORMAT!r} metadata); "
            f"use a checkpoint written by train.py."
        )
    missing = [k for k in METADATA_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks the metadata {', '.join(missing)}.")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the FP32 model described by a checkpoint's metadata and load its weights."""
    try:
        model = build_model(
            ckpt["arch"], ckpt["num_classes"], ckpt["width_multiplier"], ckpt["in_channels"]
        )
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} describes a model this version cannot build: {e}.") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(
            f"the weights in {path} do not fit a MobileNetV2 ({ckpt['arch']}, width "
            f"{ckpt['width_multiplier']}, {ckpt['num_classes']} classes): it holds another "
            f"architecture."
        ) from None
    return model.eval()


def file_digest(path):
    """The SHA-256 of a file, read in 1 MiB blocks: what the caches of a checkpoint's
    statistics and sensitivities are keyed by."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

