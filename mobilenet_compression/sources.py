"""Where the FP32 model comes from. `--checkpoint` takes three kinds of source:

- a checkpoint written by train.py: it describes itself (dataset, width, classes, input size);
- a torchvision MobileNetV2 state dict file (torchvision's own `mobilenet_v2-*.pth`, or one
  fine-tuned to N classes at any width): the width, the input channels and the classes are
  read from the tensors' shapes, what the tensors cannot say (the dataset, the input size,
  the normalisation) comes from flags, with ImageNet's as the defaults;
- `torchvision:IMAGENET1K_V1` / `torchvision:IMAGENET1K_V2`: torchvision's pretrained
  weights, loaded through its own weights API (its cache under $TORCH_HOME, its hash check on
  download, the preprocessing of its `transforms()`).

Every source ends as the same `ckpt` dict the rest of the code reads (`arch`, `dataset`,
`num_classes`, `in_channels`, `input_size`, `width_multiplier`, `model`, ...), plus `source`
(what the user named) and, for the last two, `preprocess` (resize, crop, mean, std).
"""

import dataclasses
import hashlib
import json
import os

import torch

from .checkpoint import (
    FORMAT,
    check_checkpoint,
    file_digest,
    model_from_checkpoint,
    read_torch_file,
)
from .data import DATASETS as TENSOR_DATASETS
from .data import load_dataset
from .errors import UserError
from .image_folder import default_workers, load_image_folder, preprocess_of
from .model import build_model
from .source_options import ARCHS, DATASETS, FOLDER_DATASETS, SourceOptions

TORCHVISION = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Width multipliers tried against a state dict's shapes, in steps of 0.05 (every published
# MobileNetV2 width is one of them); widths that build the same shapes build the same network.
WIDTHS = tuple(round(0.05 * k, 2) for k in range(1, 61))


def add_arguments(g):
    """The flags of a state dict source, in argument group `g`."""
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help="with a state dict or torchvision:NAME: the images it classifies; "
                        "imagefolder: --data_dir holds train/ and val/ with one folder per "
                        "class; imagenet: the same with ImageNet's 1,000 classes (default: "
                        "imagenet for torchvision:NAME, else imagefolder; a checkpoint of "
                        "train.py knows its own)")
    _shape_arguments(g)
    g.add_argument("--resize_size", type=int, default=None,
                   help="with a state dict: images are first resized so that their shorter "
                        "side is this (default: input_size x 256 / 224, 256 at 224)")
    g.add_argument("--mean", default=None, metavar="M[,M,M]",
                   help="with a state dict: per-channel mean of the normalisation, on the "
                        "0..1 scale (default: ImageNet's 0.485,0.456,0.406)")
    g.add_argument("--std", default=None, metavar="S[,S,S]",
                   help="with a state dict: per-channel standard deviation (default: "
                        "ImageNet's 0.229,0.224,0.225)")
    g.add_argument("--workers", type=int, default=None,
                   help="image folders: processes decoding images while the network runs "
                        "(default: one per core, here %d)" % default_workers())


def _shape_arguments(g):
    g.add_argument("--arch", default=None, choices=ARCHS,
                   help="with a state dict: torchvision's ImageNet strides, or this "
                        "project's CIFAR strides (default: imagenet)")
    g.add_argument("--num_classes", type=int, default=None,
                   help="with a state dict: the classes its classifier must have (default: "
                        "as many as it has)")
    g.add_argument("--input_size", type=int, default=None,
                   help="with a state dict: the side of the center crop the network sees "
                        "(default: 224)")


def load_model(spec, options=None):
    """(ckpt dict, FP32 model in eval mode and channels_last) from any source. The memory
    format is fixed here, once: the convolutions round differently in the two formats."""
    options = options or SourceOptions()
    if spec.startswith(TORCHVISION):
        ckpt = _torchvision_weights(spec, options)
    else:
        if not os.path.isfile(spec):
            raise UserError(f"checkpoint {spec} does not exist; give a checkpoint of train.py, "
                            f"a MobileNetV2 state dict file or torchvision:IMAGENET1K_V1.")
        raw = read_torch_file(spec)
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            if options.given():
                raise UserError(f"{spec} is a checkpoint of train.py, which knows its own "
                                f"dataset and model; drop {', '.join(options.given())}.")
            ckpt = {**check_checkpoint(raw, spec), "source": spec}
        else:
            ckpt = _state_dict_checkpoint(spec, _tensors_of(raw, spec), options)
    return ckpt, model_from_checkpoint(ckpt, spec).to(memory_format=torch.channels_last)


def source_digest(ckpt, data_dir=None):
    """What the caches of FP32 statistics, sensitivities and baselines are keyed by: the
    file's SHA-256 for a checkpoint of train.py (which fixes its data); for a state dict, that
    of the file together with the dataset, its folder and the preprocessing, since the same
    weights may be measured on other images."""
    digest = ckpt.get("source_sha256") or file_digest(ckpt["source"])
    if "preprocess" not in ckpt:
        return digest
    identity = {"file": digest, "dataset": ckpt["dataset"], **ckpt["preprocess"],
                "data_dir": os.path.abspath(data_dir) if data_dir else None}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _tensors_of(raw, path):
    """The state dict in a file: the file itself, or its `state_dict` / `model` entry (how
    fine-tuning scripts often save one)."""
    for candidate in (raw, *(raw.get(k) for k in ("state_dict", "model")
                             if isinstance(raw, dict))):
        if (isinstance(candidate, dict) and candidate
                and all(isinstance(v, torch.Tensor) for v in candidate.values())):
            return {k.removeprefix("module."): v for k, v in candidate.items()}
    raise UserError(f"{path} is neither a checkpoint of train.py nor a state dict (a dict of "
                    f"tensors); save one with torch.save(model.state_dict(), PATH).")


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_architecture(tensors, path):
    """(width multiplier, input channels, classes) of a MobileNetV2 state dict, from its
    shapes; any other network is one UserError naming what it holds."""
    stem, head = tensors.get("features.0.0.weight"), tensors.get("classifier.1.weight")
    if stem is None or head is None or stem.dim() != 4 or head.dim() != 2:
        some = ", ".join(list(tensors)[:3])
        raise UserError(f"{path} is not a MobileNetV2 state dict: it holds {some}, ...; a "
                        f"MobileNetV2 (torchvision.models.mobilenet_v2) has "
                        f"features.0.0.weight and classifier.1.weight.")
    channels, classes = stem.shape[1], head.shape[0]
    want = {k: tuple(v.shape) for k, v in tensors.items()}
    for width in WIDTHS:  # the CIFAR strides change no shape: one builder serves both
        with torch.device("meta"):
            if _shapes(build_model("cifar", classes, width, channels)) == want:
                return width, channels, classes
    raise UserError(f"the tensors of {path} fit no MobileNetV2 of width 0.05 to 3.0 (its "
                    f"stem has {stem.shape[0]} channels, its classifier {classes} classes): "
                    f"it holds another architecture.")


def _state_dict_checkpoint(path, tensors, options):
    width, channels, classes = infer_architecture(tensors, path)
    options = dataclasses.replace(options, dataset=options.dataset or "imagefolder")
    return _checkpoint(tensors, options, width, channels, classes, path,
                       file_digest(path), None)


def _checkpoint(tensors, options, width, channels, classes, source, digest, preprocess):
    """The ckpt dict of a state dict source, its flags checked against its tensors."""
    if options.num_classes is not None and options.num_classes != classes:
        raise UserError(f"--num_classes is {options.num_classes}, but the classifier of "
                        f"{source} has {classes} classes.")
    if options.dataset == "imagenet" and classes != 1000:
        raise UserError(f"--dataset imagenet has 1000 classes, but the classifier of {source} "
                        f"has {classes}; use --dataset imagefolder.")
    arch = options.arch or "imagenet"
    if options.dataset in TENSOR_DATASETS:  # these bring their own size and normalisation
        info = TENSOR_DATASETS[options.dataset]
        fixed = [f"--{k}" for k in ("input_size", "resize_size", "mean", "std")
                 if getattr(options, k) is not None]
        if fixed:
            raise UserError(f"--dataset {info.name} has its own image size and normalisation; "
                            f"drop {', '.join(fixed)}.")
        if channels != info.in_channels or classes != info.num_classes:
            raise UserError(f"{source} takes {channels} channels and has {classes} classes; "
                            f"{info.name} has {info.in_channels} and {info.num_classes}.")
        return _state_dict_ckpt(tensors, arch, info.name, classes, channels, info.input_size,
                                width, source, digest)
    if arch == "imagenet" and channels != 3:
        raise UserError(f"{source} takes {channels} input channels; the ImageNet "
                        f"architecture takes 3 (give --arch cifar).")
    size = options.input_size or (preprocess or {}).get("input_size") or 224
    if size < 8:
        raise UserError(f"--input_size must be at least 8 pixels, got {size}.")
    default = preprocess or {"resize_size": round(size * 256 / 224), "mean": IMAGENET_MEAN,
                             "std": IMAGENET_STD, "interpolation": "bilinear"}
    prep = {"input_size": size,
            "resize_size": options.resize_size or default["resize_size"],
            "mean": tuple(options.mean or default["mean"]),
            "std": tuple(options.std or default["std"]),
            "interpolation": default["interpolation"]}
    if prep["resize_size"] < size:
        raise UserError(f"--resize_size ({prep['resize_size']}) must be at least --input_size "
                        f"({size}).")
    for name in ("mean", "std"):
        if len(prep[name]) not in (1, channels):
            raise UserError(f"--{name} needs 1 or {channels} numbers (the network takes "
                            f"{channels} channels), got {len(prep[name])}.")
    if any(s <= 0 for s in prep["std"]):
        raise UserError("--std must be positive.")
    return {**_state_dict_ckpt(tensors, arch, options.dataset, classes, channels, size, width,
                               source, digest), "preprocess": prep}


def _state_dict_ckpt(tensors, arch, dataset, classes, channels, size, width, source, digest):
    """The checkpoint dict the rest of the package reads, for a state dict source."""
    return {"format": "state-dict", "arch": arch, "dataset": dataset, "num_classes": classes,
            "in_channels": channels, "input_size": size, "width_multiplier": width,
            "seed": None, "model": tensors, "source": source, "source_sha256": digest}


def _weights(spec):
    from torchvision.models import MobileNet_V2_Weights

    name = spec[len(TORCHVISION):]
    try:
        return MobileNet_V2_Weights[name]
    except KeyError:
        known = ", ".join(TORCHVISION + w.name for w in MobileNet_V2_Weights)
        raise UserError(f"torchvision has no MobileNetV2 weights named {name!r}; choose "
                        f"{known}.") from None


def _hub_file(weights):
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _torchvision_weights(spec, options):
    """torchvision's pretrained weights through its own API: from torch's hub cache, or
    downloaded there (and hash-checked) by torchvision."""
    weights = _weights(spec)
    if options.arch == "cifar":
        raise UserError(f"{spec} is torchvision's ImageNet network; drop --arch cifar.")
    cached = _hub_file(weights)
    try:
        tensors = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # no network (URLError), a bad hash (RuntimeError), a bad file
        raise UserError(f"{spec} is not in torch's cache and could not be downloaded "
                        f"({type(e).__name__}); put {os.path.basename(weights.url)} (from "
                        f"{weights.url}) at {cached}, or set TORCH_HOME.") from None
    transform = weights.transforms()
    preprocess = {"input_size": transform.crop_size[0], "resize_size": transform.resize_size[0],
                  "mean": tuple(transform.mean), "std": tuple(transform.std),
                  "interpolation": transform.interpolation.value}
    width, channels, classes = infer_architecture(tensors, spec)
    options = dataclasses.replace(options, dataset=options.dataset or "imagenet")
    return _checkpoint(tensors, options, width, channels, classes, spec,
                       file_digest(cached), preprocess)


def data_dir_of(ckpt, data_dir=None):
    """--data_dir, else the folder the checkpoint was trained from, else ./data (image
    folders have no default: load_data says so)."""
    if data_dir:
        return data_dir
    if ckpt["dataset"] in FOLDER_DATASETS:
        return None
    return ckpt.get("args", {}).get("data_dir") or "./data"


def load_data(ckpt, data_dir=None, workers=None):
    """(info, train, val, test) for a model: the small datasets whole in memory (data.py),
    image folders streamed from disk (image_folder.py)."""
    val_size, data_dir = ckpt.get("args", {}).get("val_size"), data_dir_of(ckpt, data_dir)
    if ckpt["dataset"] in FOLDER_DATASETS:
        return load_image_folder(ckpt["dataset"], data_dir, preprocess_of(ckpt),
                                 ckpt["num_classes"], val_size, workers)
    return load_dataset(ckpt["dataset"], data_dir, val_size)


def export_metadata(ckpt, digest):
    """What an exported file records of its model's source: the checkpoint's description
    and its digest (source_digest); for a state dict or torchvision:NAME, also the source as
    named and the preprocessing its images need."""
    meta = {k: ckpt[k] for k in ("arch", "dataset", "num_classes", "in_channels", "input_size",
                                 "width_multiplier")}
    meta["checkpoint_sha256"] = digest
    if ckpt.get("format") != FORMAT:
        meta["source"] = ckpt["source"]
        meta["source_sha256"] = ckpt["source_sha256"]
        if "preprocess" in ckpt:
            meta["preprocess"] = json.dumps(ckpt["preprocess"])
    return meta
