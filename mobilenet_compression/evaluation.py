"""Accuracy of a model (FP32 or fake-quantized) over a BatchLoader, exactly in FP32.

No autocast here, unlike a training loop's evaluation may use: bf16 would change the numbers a
fake-quantized model is meant to reproduce. Speed comes from inference_mode, large batches
and channels_last (fake-quantized weights are cached by the quantized layers themselves).
"""

import torch

from .data import BatchLoader

EVAL_BATCH_SIZE = 256


def eval_loader(split, info, batch_size=EVAL_BATCH_SIZE, channels_last=True):
    """The loader evaluation should use: no augmentation, large batches, channels_last."""
    return BatchLoader(split, info, batch_size, augment=False, channels_last=channels_last)


def prepare_for_eval(model, loader):
    """Put the model in eval mode and in the loader's memory format (a conv whose input and
    weight disagree converts one of them at every call)."""
    model.eval()
    if getattr(loader, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    return model


@torch.inference_mode()
def predict(model, loader):
    """(logits, labels) over the whole loader, on the CPU."""
    prepare_for_eval(model, loader)
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


@torch.inference_mode()
def evaluate(model, loader):
    """Top-1 accuracy in percent over `loader` (the model is put in eval mode and in the
    loader's memory format)."""
    prepare_for_eval(model, loader)
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().cpu()
        seen += len(y)
    if seen == 0:
        raise ValueError("evaluate() got an empty loader")
    return 100.0 * int(correct) / seen
