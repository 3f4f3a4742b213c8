"""Empirical bias correction (Nagel et al. 2019, section 4.2 with data): each quantized layer's
output mean put back on the FP32 network's."""

import copy

import torch
from torch import nn

from .calibrate import calibration_batch
from .prepare import QUANT_LAYERS


def _channel_mean(outputs):
    """Per-channel (dim 1) mean over every other dimension of a list of tensors. Each
    tensor is summed in its own dtype (torch's cascaded sum: within 1e-9 of a float64 sum on
    the activations here, and 20 times faster than converting them to float64 first); the
    per-tensor sums are added in float64."""
    total, count = 0.0, 0
    for y in outputs:
        dims = [d for d in range(y.dim()) if d != 1]
        total = total + y.sum(dims).double()
        count += y.numel() // y.shape[1]
    return (total / count).float()


@torch.no_grad()
def fp32_channel_means(fp32_model, loader, num_batches=None):
    """{layer name: per-output-channel mean of its output} for every conv and linear layer
    in `fp32_model.features`, over the calibration images as one batch: the targets
    `bias_correct` moves the quantized layers' outputs to. They depend on nothing but the
    FP32 model and those images, so a sweep's runs can share them (fp32_stats)."""
    return _fp32_channel_means(fp32_model, calibration_batch(loader, num_batches,
                                                              "bias correction"))


def _fp32_channel_means(fp32_model, x):
    means, handles = {}, []
    for i, block in enumerate(fp32_model.features):
        for name, m in block.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                handles.append(m.register_forward_hook(
                    lambda m, a, out, key=f"{i}.{name}": means.__setitem__(
                        key, _channel_mean([out]))))
    was_training = fp32_model.training
    fp32_model.eval()
    try:
        xf = x.clone()
        for block in fp32_model.features:
            xf = block(xf)
    finally:
        for h in handles:
            h.remove()
        fp32_model.train(was_training)
    return means


@torch.no_grad()
def bias_correct(qmodel, fp32_model, loader, num_batches=None, fp32_means=None):
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight
    Equalization and Bias Correction", section 4.2, the variant with data).

    For each quantized layer in network order, the per-output-channel mean of (quantized
    output - FP32 output) over the calibration images is subtracted through a bias on that
    layer (added if it has none; export.py stores it). "Quantized output" is the layer's
    output inside the quantized network with every earlier layer already corrected; "FP32
    output" the same layer's output in the FP32 network (`fp32_channel_means`, or
    `fp32_means` it returned before for the same model and images). To stay in network order
    without L full passes, the images are carried block by block (the model's `features`)
    as one batch: each block runs once, and a forward hook on each quantized layer
    measures its output's channel means, moves its bias and corrects the output it passes
    on, so the next layer in the block already reads the corrected one. Reads the same
    TRAINING batches as calibration; call after `calibrate`. Returns qmodel.
    """
    x = calibration_batch(loader, num_batches, "bias correction")
    want = fp32_means if fp32_means is not None else _fp32_channel_means(fp32_model, x)
    was_training = qmodel.training
    qmodel.eval()
    handles = []

    def correct(layer, args, out, key):
        delta = (_channel_mean([out]) - want[key]).to(out.dtype)
        layer.add_bias().sub_(delta.to(layer.weight.dtype))
        return out.sub_(delta.view(1, -1, *[1] * (out.dim() - 2)))

    try:
        xq = x
        for i, bq in enumerate(qmodel.features):
            for name, layer in bq.named_modules():
                if isinstance(layer, QUANT_LAYERS):
                    handles.append(layer.register_forward_hook(
                        lambda m, a, out, key=f"{i}.{name}": correct(m, a, out, key)))
            xq = bq(xq)
            for h in handles:
                h.remove()
            handles.clear()
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    return qmodel


def bias_correct_if_better(qmodel, fp32_model, loader, score, num_batches=None,
                           fp32_means=None, score_without=None):
    """`--bias_correction auto`: bias-correct a copy of `qmodel` (`bias_correct`, on the same
    TRAINING batches) and keep whichever of the two `score(model)` rates higher; a tie keeps
    the uncorrected one (its file has no added biases). At 4-bit activations the correction
    moved the same cell by -9 to +12 points from one checkpoint to the next (README), so the
    choice is measured per run. `score` must read held-out images (run.py: the validation
    split train.py kept out of training), never the calibration images or the test set.
    `score_without`: `score(qmodel)` when the caller already has it (run.py, after the clip
    search's own held-out choice). Returns (model, used, score_without, score_with).
    """
    corrected = bias_correct(copy.deepcopy(qmodel), fp32_model, loader, num_batches,
                             fp32_means)
    without = score(qmodel) if score_without is None else score_without
    with_ = score(corrected)
    if with_ > without:
        return corrected, True, without, with_
    return qmodel, False, without, with_
