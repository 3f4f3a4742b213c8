"""What a model source is told beside --checkpoint (`SourceOptions`: the flags a state dict
needs) and the names those flags accept, as plain values and checks. No torch here, so that a
run's configuration is checked (config.py, a sweep's parameters) without loading the engine;
sources.py loads what they describe."""

import dataclasses
import math
from dataclasses import dataclass

from .errors import UserError

# data.DATASETS' names (tests/test_sources.py checks they are the same): the datasets that
# bring their own size and normalisation.
TENSOR_DATASET_NAMES = ("cifar10", "cifar100", "fashion-mnist")
# The image-folder datasets: `imagenet` is `imagefolder` with ImageNet's 1,000 classes.
FOLDER_DATASETS = ("imagefolder", "imagenet")
ARCHS = ("imagenet", "cifar")
DATASETS = (*TENSOR_DATASET_NAMES, *FOLDER_DATASETS)


@dataclass(frozen=True)
class SourceOptions:
    """What a state dict cannot say about itself: flags of every command that loads a model.
    None means the default (ImageNet's preprocessing, torchvision's ImageNet architecture)."""
    dataset: str | None = None
    arch: str | None = None
    num_classes: int | None = None
    input_size: int | None = None
    resize_size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None

    def given(self):
        return [f"--{f.name}" for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None]


def parse_floats(value, flag):
    """(0.485, 0.456, 0.406) from "0.485,0.456,0.406", a yaml list or one number."""
    if value is None or value == "":
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        numbers = tuple(float(x) for x in items)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be numbers separated by commas, got {value!r}.") from None
    if not numbers or not all(math.isfinite(x) for x in numbers):
        raise UserError(f"{flag} must be numbers separated by commas, got {value!r}.")
    return numbers


def options_from(values):
    """SourceOptions from a dict of flags (or a RunConfig's fields)."""
    options = {f.name: values.get(f.name) for f in dataclasses.fields(SourceOptions)}
    for name in ("mean", "std"):
        options[name] = parse_floats(options[name], f"--{name}")
    return SourceOptions(**options)
