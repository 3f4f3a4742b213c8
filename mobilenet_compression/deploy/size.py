"""The size metrics of DESIGN.md (orig_mb, compressed_mb, compression_ratio,
weight_compression_ratio, activation_compression_ratio): measured on the real exported file
(export.py) where they are about the file, pure functions of the model and its plan where
they are about weights and activations; and the size model a size budget plans with
(`size_model`: the bytes of a checkpoint's file that do not depend on the plan)."""

import math
import os
import struct
import tempfile

import torch

from ..quant.bias_correction import bias_correct
from ..quant.calibrate import calibrate
from ..quant.convert import convert
from ..quant.equalize import equalize_depthwise_inputs
from ..quant.precision import FP32, is_fp32, quantized_layer_names, weight_layers
from ..quant.prepare import quant_layers, quantize_model
from .export import export_quantized, packed_nbytes

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


def activation_elements(rows, plan):
    """Per image: the number of input-activation elements of each quantized layer (name ->
    count), from the shapes in the plan's BitOps rows (quant/bitops.py's bitops_report):
    channels x height x width of a conv's input, the features of a Linear's."""
    return {r["name"]: r["in_channels"] * (math.prod(r["input_hw"]) if r["input_hw"] else 1)
            for r in rows if r["name"] in plan}


def activation_compression_ratio(rows, plan):
    """How much smaller the quantized layers' input activations are than in FP32, per image:
    sum(elements x 32) / sum(elements x activation_bits) over the layers of `plan` (the
    quantized model's, prepare.precision_plan), with layers the plan leaves FP32 counted at
    32 bits. The stem conv's input (the image) and the classifier's input are FP32 in both
    and not counted. `rows` are the plan's BitOps rows."""
    counts = activation_elements(rows, plan)
    fp32 = sum(32 * n for n in counts.values())
    quant = sum(n * (FP32 if is_fp32(plan[k][1]) else plan[k][1]) for k, n in counts.items())
    return fp32 / quant if quant else 1.0


def compression_metrics(qmodel, fp32_state_dict, path, rows, plan):
    """The DESIGN.md size metrics of an exported model, as a dict, with container_overhead:
    the share of the file that is safetensors header rather than tensor data. `plan` is the
    model's precision plan, `rows` its BitOps rows."""
    orig, comp = orig_mb(fp32_state_dict), compressed_mb(path)
    header, size = container_bytes(path)
    return {
        "orig_mb": orig,
        "compressed_mb": comp,
        "container_overhead": header / size,
        "compression_ratio": compression_ratio(orig, comp),
        "weight_compression_ratio": weight_compression_ratio(qmodel),
        "activation_compression_ratio": activation_compression_ratio(rows, plan),
    }


def reference_size(metadata, fp32, train, info, bias_correction, equalize=False):
    """Bytes of the file export.py writes for this checkpoint at W8A8 (with the file metadata
    of its runs, sources.export_metadata), prepared as a run prepares one ([equalize,]
    calibrate, bias correction, convert), on 32 training images since only the tensors' sizes
    matter, in a temporary folder that is removed afterwards."""
    loader = train.head(32).loader(info, 32, channels_last=True)
    if equalize:  # its clamps' table is part of the file
        fp32, _ = equalize_depthwise_inputs(fp32, loader, 1)
    qmodel = quantize_model(fp32, (8, 8))
    calibrate(qmodel, loader, "minmax", 1)  # the values do not change the size, only where
    if bias_correction:                     # they lie: every layer's sign and scale count
        bias_correct(qmodel, fp32, loader, 1)
    convert(qmodel)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w8a8.safetensors")
        return export_quantized(qmodel, path, {**metadata, "method": "ptq"})


def size_model(metadata, fp32, train, info, bias_correction, equalize=False):
    """Fixed bytes of this checkpoint's exported file: a real W8A8 export (prepared as a run
    prepares one) minus its packed weights; a plan adds ceil(parameters x bits / 8) per layer."""
    reference = reference_size(metadata, fp32, train, info, bias_correction, equalize)
    names = set(quantized_layer_names(fp32))
    return reference - sum(m.weight.numel() for n, m in weight_layers(fp32)
                           if n in names)  # the packed weights, at 8 bits
