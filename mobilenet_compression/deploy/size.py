"""The size metrics of DESIGN.md (orig_mb, compressed_mb, compression_ratio,
weight_compression_ratio, activation_compression_ratio): measured on the real exported file
(export.py) where they are about the file, pure functions of the model and its plan where
they are about weights and activations."""

import os
import struct

import torch

from ..quant.precision import is_fp32
from ..quant.prepare import activations_fp32, quant_layers
from .export import packed_nbytes

MIB = 2**20


def tensor_bytes(state_dict):
    return sum(t.numel() * t.element_size() for t in state_dict.values()
               if isinstance(t, torch.Tensor))


def orig_mb(state_dict):
    """Bytes of the FP32 checkpoint's model tensors (its state dict, BN counters included)
    / 2^20. Takes a state dict or a model."""
    if isinstance(state_dict, torch.nn.Module):
        state_dict = state_dict.state_dict()
    return tensor_bytes(state_dict) / MIB


def compressed_mb(path):
    """The exported file's real size / 2^20."""
    return os.path.getsize(path) / MIB


def container_bytes(path):
    """(header bytes, file bytes) of a safetensors file: the header is the 8-byte
    little-endian length at its start plus the JSON (names, shapes, offsets, metadata) that
    length announces; everything after it is tensor data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length, os.path.getsize(path)


def compression_ratio(orig, compressed):
    return orig / compressed


def weight_compression_ratio(qmodel):
    """FP32 bytes of the quantized layers' weights / the bytes they take in the file
    (packed integers + 4 bytes per scale). Layers the plan leaves FP32 count 4 bytes per
    weight on both sides; the stem conv, classifier and BatchNorm are not included."""
    fp32, stored = 0, 0
    for _, layer in quant_layers(qmodel):
        n = layer.weight.numel()
        fp32 += 4 * n
        wq = layer.weight_quant
        if wq.enabled:
            stored += packed_nbytes(n, layer.weight_bits) + 4 * wq.scale.numel()
        else:
            stored += 4 * n
    return fp32 / stored if stored else 1.0


def activation_elements(qmodel, input_size, in_channels):
    """Per image at input_size x input_size: the number of input-activation elements of each
    quantized layer (name -> count), counted with forward hooks on one zero image."""
    counts, handles = {}, []
    for name, layer in quant_layers(qmodel):
        def hook(module, args, name=name):
            counts[name] = args[0][0].numel()
        handles.append(layer.register_forward_pre_hook(hook))
    was_training = qmodel.training
    try:
        qmodel.eval()
        param = next(qmodel.parameters())
        x = torch.zeros(1, in_channels, input_size, input_size, device=param.device)
        with torch.inference_mode(), activations_fp32(qmodel):
            qmodel(x)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    return counts


def activation_compression_ratio(qmodel, input_size, in_channels):
    """How much smaller the quantized layers' input activations are than in FP32, per image:
    sum(elements x 32) / sum(elements x activation_bits) over the quantized layers, with
    layers the plan leaves FP32 counted at 32 bits. The stem conv's input (the image) and the
    classifier's input are FP32 in both and not counted."""
    counts = activation_elements(qmodel, input_size, in_channels)
    layers = dict(quant_layers(qmodel))
    fp32 = sum(32 * n for n in counts.values())
    quant = sum(n * (32 if is_fp32(layers[k].activation_bits) else layers[k].activation_bits)
                for k, n in counts.items())
    return fp32 / quant if quant else 1.0


def compression_metrics(qmodel, fp32_state_dict, path, input_size, in_channels):
    """The DESIGN.md size metrics of an exported model, as a dict, with container_overhead:
    the share of the file that is safetensors header rather than tensor data."""
    orig, comp = orig_mb(fp32_state_dict), compressed_mb(path)
    header, size = container_bytes(path)
    return {
        "orig_mb": orig,
        "compressed_mb": comp,
        "container_overhead": header / size,
        "compression_ratio": compression_ratio(orig, comp),
        "weight_compression_ratio": weight_compression_ratio(qmodel),
        "activation_compression_ratio": activation_compression_ratio(qmodel, input_size,
                                                                     in_channels),
    }
