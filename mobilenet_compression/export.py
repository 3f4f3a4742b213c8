"""The exported quantized model: one file of bit-packed integer weights and FP32 tensors, and
the size metrics measured on it (DESIGN.md: orig_mb, compressed_mb, compression_ratio,
weight_compression_ratio, activation_compression_ratio).

File format (all integers little-endian; loading it executes no code, unlike a pickle):

    bytes 0-3    magic b"MBQ1"
    bytes 4-7    uint32  format version (1)
    bytes 8-15   uint64  H, the length of the JSON header in bytes
    bytes 16..   the header, UTF-8 JSON:
                   {"format": "mobilenet-compression/quantized-v1",
                    "metadata": {arch, num_classes, width_multiplier, in_channels, ...},
                    "weight_granularity": "per_channel" | "per_tensor",
                    "layers": {name: {"weight_bits", "activation_bits", "weight_shape",
                                      "activation_signed", "activation_zero_point"}},
                    "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}
    bytes 16+H.. the tensors' raw bytes, back to back in header order ("offset" counts from
                 here), no padding, so file size = 16 + H + sum(nbytes).

Tensors:
- `<layer>.weight.packed` (uint8) for each quantized layer with weight_bits b in 2..8: the
  integer weights q in [-(2^(b-1)-1), 2^(b-1)-1] as offset-binary codes q + 2^(b-1) (b bits,
  never 0), written LSB first into one little-endian bit stream per layer (np.packbits,
  bitorder="little"), in the weight's row-major order: ceil(numel * b / 8) bytes.
- `<layer>.weight_quant.scale` (float32, one per output channel, or one per tensor).
- `<layer>.input_quant.scale` (float32, one) for each quantized input activation; its
  signedness and zero point (always 0) are in the header.
- every other tensor the model needs at inference, float32, under its state-dict name: the
  stem conv, every BatchNorm's weight (gamma), bias, running_mean and running_var, the
  classifier, biases (also those bias correction gave a quantized layer), and weights of
  layers the plan leaves at 16/32 bits. BatchNorm's
  num_batches_tracked is a training counter and is not stored.
The dequantized weight q * scale equals the fake-quantized weight bit for bit, so the
loaded model's logits equal the fake-quantized model's.
"""

import json
import math
import os
import struct

import numpy as np
import torch

from .files import atomic_write
from .errors import UserError
from .model import build_model
from .quantization import (
    activations_fp32,
    is_fp32,
    quant_layers,
    quantize_model,
)

MAGIC = b"MBQ1"
VERSION = 1
FORMAT = "mobilenet-compression/quantized-v1"
PREAMBLE = struct.Struct("<4sIQ")  # magic, version, header length: 16 bytes
MIB = 2**20
REBUILD_KEYS = ("arch", "num_classes", "width_multiplier", "in_channels")
_DTYPES = {"float32": (torch.float32, np.float32), "uint8": (torch.uint8, np.uint8)}


# ---------------------------------------------------------------------------- bit packing

def pack_bits(codes, bits):
    """Unsigned b-bit codes (any integer array, values < 2^b) -> little-endian bit stream of
    ceil(len * b / 8) bytes: code i occupies bits [i*b, (i+1)*b), LSB first."""
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    planes = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1, bitorder="little")
    return np.packbits(planes[:, :bits].reshape(-1), bitorder="little")


def unpack_bits(packed, bits, count):
    """Inverse of pack_bits: `count` unsigned codes (uint8)."""
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits,
                           bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (planes.astype(np.uint16) @ weights).astype(np.uint8)


def packed_nbytes(numel, bits):
    return math.ceil(numel * bits / 8)


# ---------------------------------------------------------------------------- export

def _fp32_tensors(qmodel):
    """Every state-dict tensor inference needs that is not a quantized weight or a quantizer
    parameter: name -> float32 tensor."""
    skip = set()
    for name, layer in quant_layers(qmodel):
        skip.update({f"{name}.input_quant.scale", f"{name}.weight_quant.scale"})
        if layer.weight_quant.enabled:
            skip.add(f"{name}.weight")
    out = {}
    for key, t in qmodel.state_dict().items():
        if key in skip or key.endswith("num_batches_tracked"):
            continue
        out[key] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def _tensor_records(qmodel):
    """(name, numpy array) of everything the file stores, in file order, and the per-layer
    header entries."""
    records, layers = [], {}
    for name, layer in quant_layers(qmodel):
        aq, wq = layer.input_quant, layer.weight_quant
        if aq.enabled and not aq.calibrated:
            raise ValueError(f"layer {name} is not calibrated; calibrate before exporting")
        layers[name] = {
            "weight_bits": layer.weight_bits,
            "activation_bits": layer.activation_bits,
            "weight_shape": list(layer.weight.shape),
            "activation_signed": bool(aq.signed) if aq.enabled else None,
            "activation_zero_point": 0 if aq.enabled else None,
        }
        if wq.enabled:
            q = wq.integers(layer.weight).cpu().numpy().astype(np.int16)
            codes = (q + 2 ** (layer.weight_bits - 1)).astype(np.uint8)
            records.append((f"{name}.weight.packed", pack_bits(codes, layer.weight_bits)))
            records.append((f"{name}.weight_quant.scale",
                            wq.scale.detach().cpu().float().numpy()))
        if aq.enabled:
            records.append((f"{name}.input_quant.scale",
                            aq.scale.detach().cpu().float().numpy().reshape(1)))
    for key, t in _fp32_tensors(qmodel).items():
        records.append((key, t.numpy()))
    return records, layers


def _weight_granularity(qmodel):
    kinds = {m.weight_quant.granularity for _, m in quant_layers(qmodel) if m.weight_quant.enabled}
    return kinds.pop() if len(kinds) == 1 else "per_channel"


def export_quantized(qmodel, path, metadata):
    """Write `qmodel` (quantized and calibrated) to `path` atomically; return the file size
    in bytes. `metadata` (JSON-able: plain Python numbers and strings, not numpy scalars)
    must name arch, num_classes, width_multiplier and in_channels, which load_quantized needs
    to rebuild the network (a checkpoint's metadata does); it is stored as given."""
    missing = [k for k in REBUILD_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"export metadata lacks {', '.join(missing)}")
    records, layers = _tensor_records(qmodel)
    tensors, offset = [], 0
    for name, array in records:
        dtype = {np.dtype(np.float32): "float32", np.dtype(np.uint8): "uint8"}[array.dtype]
        tensors.append({"name": name, "dtype": dtype, "shape": list(array.shape),
                        "offset": offset, "nbytes": int(array.nbytes)})
        offset += array.nbytes
    header = json.dumps({
        "format": FORMAT,
        "metadata": metadata,
        "weight_granularity": _weight_granularity(qmodel),
        "layers": layers,
        "tensors": tensors,
    }, separators=(",", ":")).encode("utf-8")

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)

    def write(f):
        f.write(PREAMBLE.pack(MAGIC, VERSION, len(header)))
        f.write(header)
        for _, array in records:
            f.write(np.ascontiguousarray(array).tobytes())

    atomic_write(path, write)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------- load

def read_quantized(path):
    """(header dict, {name: torch tensor}) of an exported file; a bad file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"quantized model {path} does not exist; export one first.")
    with open(path, "rb") as f:
        data = f.read()
    bad = UserError(f"{path} is not a mobilenet-compression quantized model file (or it is "
                    f"truncated); export it again.")
    if len(data) < PREAMBLE.size:
        raise bad
    magic, version, hlen = PREAMBLE.unpack_from(data)
    if magic != MAGIC or version != VERSION or PREAMBLE.size + hlen > len(data):
        raise bad
    try:
        header = json.loads(data[PREAMBLE.size:PREAMBLE.size + hlen].decode("utf-8"))
        start = PREAMBLE.size + hlen
        tensors = {}
        for rec in header["tensors"]:
            torch_dtype, np_dtype = _DTYPES[rec["dtype"]]
            count = rec["nbytes"] // np.dtype(np_dtype).itemsize
            if start + rec["offset"] + rec["nbytes"] > len(data):
                raise ValueError("truncated")
            array = np.frombuffer(data, np_dtype, count, start + rec["offset"]).copy()
            tensors[rec["name"]] = torch.from_numpy(array.reshape(rec["shape"]))
    except (ValueError, KeyError, TypeError):
        raise bad from None
    if header.get("format") != FORMAT:
        raise bad
    return header, tensors


def load_quantized(path):
    """Rebuild the quantized model stored in `path` (eval mode, contiguous memory format).
    Its logits equal those of the model that was exported."""
    header, tensors = read_quantized(path)
    try:
        meta = header["metadata"]
        model = build_model(meta["arch"], meta["num_classes"], meta["width_multiplier"],
                            meta["in_channels"])
        plan = {n: (e["weight_bits"], e["activation_bits"])
                for n, e in header["layers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{path} names no network this version can build; export it "
                        f"again.") from None
    qmodel = quantize_model(model, plan, weight_granularity=header["weight_granularity"])
    layers = dict(quant_layers(qmodel))
    for name, layer in layers.items():  # biases added by bias correction
        if f"{name}.bias" in tensors:
            layer.add_bias()
    state = qmodel.state_dict()
    expected_fp32 = set(_fp32_tensors(qmodel))
    try:
        for name, entry in header["layers"].items():
            layer = layers[name]
            if layer.weight_quant.enabled:
                b = entry["weight_bits"]
                shape = entry["weight_shape"]
                codes = unpack_bits(tensors.pop(f"{name}.weight.packed").numpy(), b,
                                    math.prod(shape))
                q = torch.from_numpy(codes.astype(np.int16) - 2 ** (b - 1)).reshape(shape)
                scale = tensors.pop(f"{name}.weight_quant.scale")
                view = [-1] + [1] * (len(shape) - 1) if scale.numel() > 1 else [1] * len(shape)
                # q * scale in float32 is what the fake-quantize op returns for q.
                state[f"{name}.weight"] = q.float() * scale.reshape(view)
                state[f"{name}.weight_quant.scale"] = scale
            if layer.input_quant.enabled:
                scale = tensors.pop(f"{name}.input_quant.scale")
                layer.input_quant.set_qparams(scale=float(scale[0]),
                                              signed=entry["activation_signed"])
                state[f"{name}.input_quant.scale"] = layer.input_quant.scale
        if set(tensors) != expected_fp32:
            raise KeyError(sorted(set(tensors) ^ expected_fp32))
        for key, t in tensors.items():
            if state[key].shape != t.shape:
                raise KeyError(key)
            state[key] = t
        qmodel.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError):
        raise UserError(f"{path} does not describe the network its metadata names; export "
                        f"it again.") from None
    return qmodel.eval()


# ---------------------------------------------------------------------------- metrics

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
    """The DESIGN.md size metrics of an exported model, as a dict."""
    orig, comp = orig_mb(fp32_state_dict), compressed_mb(path)
    return {
        "orig_mb": orig,
        "compressed_mb": comp,
        "compression_ratio": compression_ratio(orig, comp),
        "weight_compression_ratio": weight_compression_ratio(qmodel),
        "activation_compression_ratio": activation_compression_ratio(qmodel, input_size,
                                                                     in_channels),
    }
