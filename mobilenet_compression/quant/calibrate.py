"""Calibrate: activation ranges from training images."""

import itertools

import torch

from ..errors import UserError
from .choices import CALIBRATION_METHODS, check_choice
from .fake_quant import ACT_SAMPLE_SIZE
from .prepare import act_quantizers


def training_batches(loader, num_batches, what):
    """How many batches of `loader` to read, after checking it reads TRAINING images: test
    or validation images must never shape a quantized model."""
    split = getattr(loader, "split", None)
    split_name = getattr(split, "name", None)
    if split_name != "train":
        raise UserError(
            f"{what} must read training images, got the {split_name!r} split; pass a "
            f"BatchLoader over the train split."
        )
    if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
        raise UserError(f"--calib_batches must be at least 1, got {num_batches}.")
    total = len(loader) if num_batches is None else min(num_batches, len(loader))
    if total < 1:
        raise UserError(f"the {what} split holds no images; use a non-empty train split.")
    return total


def calibrate(qmodel, loader, method="minmax", num_batches=None, seed=0):
    """Set every activation quantizer's scale and signedness from training images.

    loader: a data.BatchLoader over the TRAIN split (anything with `.split.name == "train"`
    that yields (images, labels)); other splits raise a UserError, so test images can never
    leak into calibration. Runs `num_batches` batches (all when None) through the model in
    eval mode with activations unquantized and weights quantized, recording each quantized
    layer's input: its min/max (minmax; also decides signedness), and a seeded random sample
    of its values for `percentile` (the 99.99th percentile of |x|) and `mse` (the clip r*absmax
    with the smallest squared error on the sample). `loss` is not a per-input method: calibrate
    with `mse`, round the weights, then `clip_search.search_clips_if_better` (run.py's order).
    Returns qmodel.
    """
    check_choice(method, CALIBRATION_METHODS, "--calibration")
    if method == "loss":
        raise ValueError("calibrate(method='loss'): calibrate with 'mse', then move the clips "
                         "with clip_search.search_clips_if_better (as run.py does)")
    total = training_batches(loader, num_batches, "calibration")
    quantizers = act_quantizers(qmodel)
    per_batch = 0 if method == "minmax" else max(1024, ACT_SAMPLE_SIZE // total)
    for i, q in enumerate(quantizers):
        q.start_observing(per_batch, seed=seed * 1_000_003 + i)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.inference_mode():
            seen = 0
            for x, _ in loader:
                qmodel(x)
                seen += 1
                if seen >= total:
                    break
        for q in quantizers:
            q.finish_observing(method)
    except BaseException:
        for q in quantizers:
            q.reset_stats()
            q.mode = "quantize"
        raise
    finally:
        qmodel.train(was_training)
    return qmodel


def calibration_batch(loader, num_batches, what):
    total = training_batches(loader, num_batches, what)
    return torch.cat([x for x, _ in itertools.islice(iter(loader), total)])
