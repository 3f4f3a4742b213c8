"""The one `evaluate`: accuracy (and loss) of a model, FP32 or fake-quantized, over a loader
(data.BatchLoader, or image_folder.FolderLoader for an image folder). Training (validation
each epoch) and quantization runs both use it.

Quantization runs evaluate exactly in FP32: bf16 would change the numbers a fake-quantized
model is meant to reproduce. Training may pass bf16=True, which autocasts on a CUDA device
only (as the training step does). Speed comes from inference_mode, large batches,
channels_last and, for quantization runs, BatchNorm folded into the conv before it
(`fold_batchnorm`: on 2 CPU threads an eval-mode BatchNorm costs most of what its conv does
in this small network).
"""

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .quant.prepare import QUANT_LAYERS


EVAL_BATCH_SIZE = 256


def eval_loader(split, info, batch_size=EVAL_BATCH_SIZE, channels_last=True):
    """The loader evaluation should use: no augmentation, large batches, channels_last."""
    return split.loader(info, batch_size, augment=False, channels_last=channels_last)


def prepare_for_eval(model, loader):
    """Put the model in eval mode and in the loader's memory format (a conv whose input and
    weight disagree converts one of them at every call)."""
    model.eval()
    if getattr(loader, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    return model


def fold_batchnorm(model):
    """A copy of `model` for inference in which every BatchNorm2d that follows a Conv2d in
    the same container is folded into that conv (torch's own `fuse_conv_bn_weights`) and
    replaced by Identity. A quantized conv's weight is folded as its quantizer gives it (after
    `convert`, the quantized values themselves) and is not quantized again, so the copy
    computes the same function up to float rounding. `model` is left as it is."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            weight = conv.weight
            if isinstance(conv, QUANT_LAYERS):
                with torch.no_grad():
                    weight = conv.quantized_weight()
                conv.weight_quant.enabled = False
            conv.weight, conv.bias = fuse_conv_bn_weights(
                weight.detach(), None if conv.bias is None else conv.bias.detach(),
                bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            setattr(parent, bn_name, nn.Identity())
    return model


def _maybe_folded(model, fold):
    if not fold:
        return model
    with torch.inference_mode(False):  # the copy's parameters must be ordinary tensors
        return fold_batchnorm(model)


@torch.inference_mode()
def predict(model, loader, fold=True):
    """(logits, labels) over the whole loader, on the CPU; with `fold`, of
    `fold_batchnorm(model)` (the same function, faster)."""
    model = _maybe_folded(model, fold)
    prepare_for_eval(model, loader)
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


@torch.inference_mode()
def evaluate(model, loader, criterion=None, bf16=False, fold=False):
    """Top-1 accuracy in percent over `loader`; with a `criterion`, (mean loss, accuracy).
    The model is put in eval mode and in the loader's memory format; with `fold`, a copy of
    it with BatchNorm folded (`fold_batchnorm`) is evaluated instead."""
    model = _maybe_folded(model, fold)
    prepare_for_eval(model, loader)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=bf16 and loader.split.device.type == "cuda")
    correct = torch.zeros((), dtype=torch.int64)
    loss_sum, seen = 0.0, 0
    for x, y in loader:
        with autocast:
            logits = model(x)
        if criterion is not None:
            loss_sum += float(criterion(logits.float(), y)) * len(y)
        correct += (logits.argmax(1) == y).sum().cpu()
        seen += len(y)
    if seen == 0:
        raise ValueError("evaluate() got an empty loader")
    accuracy = 100.0 * int(correct) / seen
    return (loss_sum / seen, accuracy) if criterion is not None else accuracy


def accuracy(logits, labels):
    return 100.0 * float((logits.argmax(1) == labels).double().mean())


def agreement(logits_a, logits_b):
    """Percent of images whose top-1 class is the same in both."""
    return 100.0 * float((logits_a.argmax(1) == logits_b.argmax(1)).double().mean())


def largest_difference(model, other, split, info):
    """The largest absolute difference between two models' logits over `split`'s images, in
    one batch (e.g. a model against its exported file loaded back)."""
    probe = split.loader(info, len(split), channels_last=True)
    return float((predict(model, probe)[0] - predict(other, probe)[0]).abs().max())
