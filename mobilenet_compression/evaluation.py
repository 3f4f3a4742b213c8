"""The one `evaluate`: accuracy (and loss) of a model, FP32 or fake-quantized, over a
BatchLoader. Training (validation each epoch) and quantization runs both use it.

Quantization runs evaluate exactly in FP32: bf16 would change the numbers a fake-quantized
model is meant to reproduce. Training may pass bf16=True, which autocasts on a CUDA device
only (as the training step does). Speed comes from inference_mode, large batches and
channels_last.
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
def evaluate(model, loader, criterion=None, bf16=False):
    """Top-1 accuracy in percent over `loader`; with a `criterion`, (mean loss, accuracy).
    The model is put in eval mode and in the loader's memory format."""
    prepare_for_eval(model, loader)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=bf16 and loader.split.images.is_cuda)
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
