"""The exported quantized model: one safetensors file of bit-packed integer weights and FP32
tensors (the size metrics measured on it are size.py's).

File format: safetensors (an 8-byte little-endian header length N, N bytes of JSON header:
each tensor's dtype, shape and offsets plus a string -> string "__metadata__", then the
tensors' bytes). Loading it executes no code, and `safetensors.safe_open(path, "np")` reads
it without this package. The tensors are few and grouped: one header entry per tensor cost
10.4% of a W4A8 file at width 0.35 (the .mbq format this replaces); five grouped tensors
and compact tables cost 1.5% (5,816 of 389,380 bytes; `container_overhead` logs it).

    weights_packed     uint8    every quantized layer's packed weights, layer after layer
    weight_scales      float32  their scales: one per output channel (or one per layer)
    activation_scales  float32  one per quantized input activation (zero point 0)
    batchnorm          float32  [4, C]: rows gamma, beta, running_mean, running_var; one
                                column per channel of every BatchNorm, module after module
    fp32               float32  every other tensor inference needs, flattened, back to back:
                                stem conv, classifier, biases (also those bias correction gave
                                a quantized layer), weights of layers the plan leaves at 16/32

Metadata: "format"; the run's metadata as given (arch, num_classes, width_multiplier,
in_channels, dataset, input_size, method, checkpoint_sha256, ...; numbers written as JSON);
"weight_granularity"; and three JSON tables saying where each piece lies:
    layers     [[name, weight_bits, activation_bits, activation_signed, weight_shape,
                 packed_offset, weight_scale_offset, activation_scale_index], ...]
               (columns also named in "layer_columns"; null where that part stays FP32)
    batchnorm  [[module name, first column, channels], ...]
    fp32       [[state-dict name, offset, shape], ...]
and, in a run with --equalize true, a fourth (quant/equalize.py: the ReLU6 before each depthwise
conv became a clamp to [0, max], its channels scaled into the stored BatchNorm and weights):
    clamps     [[module name, max], ...]
and, where layers read 8-bit inputs, a fifth (quant/output_grids.py: the 8-bit grids on each
residual block's projection output and on the last conv's output, which an integer engine
needs and the model applies too; codes -128..127 when signed, else 0..255):
    output_grids  [[module name, scale, signed], ...]

A layer's weights by hand (b = weight_bits, n = prod(weight_shape), o = packed_offset):
    bits  = np.unpackbits(weights_packed[o : o + ceil(n * b / 8)], bitorder="little")
    codes = bits[: n * b].reshape(n, b) @ (1 << np.arange(b))   # LSB first, q + 2^(b-1)
    q     = (codes - 2 ** (b - 1)).reshape(weight_shape)       # in [-(2^(b-1)-1), 2^(b-1)-1]
    w     = q * weight_scales[s : s + c].reshape(c, 1, ...)    # s = weight_scale_offset,
                                                              # c = out channels (or 1)
The dequantized weight q * scale equals the fake-quantized weight bit for bit, so the
loaded model's logits equal the fake-quantized model's. BatchNorm's num_batches_tracked is a
training counter and is not stored.
"""

import json
import math
import os
import struct

import numpy as np
import safetensors
import safetensors.numpy
import torch
from torch import nn

from ..errors import UserError
from ..files import atomic_write
from ..model import build_model
from ..quant.equalize import clamp_table, restore_clamps
from ..quant.output_grids import output_grid_table, restore_output_grids
from ..quant.prepare import quant_layers, quantize_model

FORMAT = "mobilenet-compression/quantized-v2"
# What load_quantized needs to rebuild the network, and how to read it back from a string.
REBUILD_KEYS = {"arch": str, "num_classes": int, "width_multiplier": float, "in_channels": int}
LAYER_COLUMNS = ("name", "weight_bits", "activation_bits", "activation_signed", "weight_shape",
                 "packed_offset", "weight_scale_offset", "activation_scale_index")
BN_ROWS = ("weight", "bias", "running_mean", "running_var")
RESERVED = {"format", "weight_granularity", "layer_columns", "layers", "batchnorm", "fp32",
            "clamps", "output_grids"}


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

def _concat(arrays, dtype, axis=0):
    """np.concatenate that also takes no arrays (a plan with nothing quantized)."""
    if not arrays:
        return np.zeros((4, 0) if axis else 0, dtype)
    return np.ascontiguousarray(np.concatenate(arrays, axis=axis), dtype)


def _batchnorms(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _fp32_tensors(qmodel):
    """Every state-dict tensor inference needs that is neither a quantized weight, a quantizer
    scale nor a BatchNorm tensor: name -> float32 array, in state-dict order."""
    skip = set()
    for name, layer in quant_layers(qmodel):
        skip.update({f"{name}.input_quant.scale", f"{name}.weight_quant.scale"})
        if layer.weight_quant.enabled:
            skip.add(f"{name}.weight")
    for name, _ in _batchnorms(qmodel):
        skip.update(f"{name}.{p}" for p in (*BN_ROWS, "num_batches_tracked"))
    return {k: t.detach().to("cpu", torch.float32).contiguous().numpy()
            for k, t in qmodel.state_dict().items() if k not in skip}


def _layer_tensors(qmodel):
    """The "layers" table (one row per quantized layer, LAYER_COLUMNS) and the three tensors
    it points into: packed weights, weight scales, activation scales."""
    rows, packed, wscales, ascales = [], [], [], []
    n_packed = n_wscales = 0
    for name, layer in quant_layers(qmodel):
        aq, wq = layer.input_quant, layer.weight_quant
        if aq.enabled and not aq.calibrated:
            raise ValueError(f"layer {name} is not calibrated; calibrate before exporting")
        row = dict.fromkeys(LAYER_COLUMNS)
        row.update(name=name, weight_bits=layer.weight_bits,
                   activation_bits=layer.activation_bits,
                   weight_shape=list(layer.weight.shape))
        if wq.enabled:
            q = wq.integers(layer.weight).cpu().numpy().astype(np.int16)
            packed.append(pack_bits(q + 2 ** (layer.weight_bits - 1), layer.weight_bits))
            wscales.append(wq.scale.detach().cpu().float().numpy().reshape(-1))
            row.update(packed_offset=n_packed, weight_scale_offset=n_wscales)
            n_packed += len(packed[-1])
            n_wscales += len(wscales[-1])
        if aq.enabled:
            row.update(activation_signed=bool(aq.signed), activation_scale_index=len(ascales))
            ascales.append(aq.scale.detach().cpu().float().numpy().reshape(1))
        rows.append([row[c] for c in LAYER_COLUMNS])
    return rows, {"weights_packed": _concat(packed, np.uint8),
                  "weight_scales": _concat(wscales, np.float32),
                  "activation_scales": _concat(ascales, np.float32)}


def _batchnorm_tensor(qmodel):
    """The [4, C] batchnorm tensor (rows BN_ROWS) and its table [[name, first column,
    channels], ...]."""
    columns, table, start = [], [], 0
    for name, bn in _batchnorms(qmodel):
        columns.append(np.stack([getattr(bn, p).detach().cpu().float().numpy()
                                 for p in BN_ROWS]))
        table.append([name, start, bn.num_features])
        start += bn.num_features
    return _concat(columns, np.float32, axis=1), table


def _fp32_tensor(qmodel):
    """Every other FP32 tensor flattened into one, and its table [[name, offset, shape], ...]."""
    flat, table, offset = [], [], 0
    for name, array in _fp32_tensors(qmodel).items():
        flat.append(array.reshape(-1))
        table.append([name, offset, list(array.shape)])
        offset += array.size
    return _concat(flat, np.float32), table


def _weight_granularity(qmodel):
    kinds = {m.weight_quant.granularity for _, m in quant_layers(qmodel) if m.weight_quant.enabled}
    return kinds.pop() if len(kinds) == 1 else "per_channel"


def _text(key, value):
    """Safetensors metadata is string -> string: strings as they are, numbers as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise TypeError(f"export metadata {key!r} must be a string or a number, not "
                    f"{type(value).__name__}")


def _json(table):
    return json.dumps(table, separators=(",", ":"))


def _sorted_metadata(data):
    """`data` (a serialized safetensors file) with its metadata keys in sorted order.
    safetensors 0.8 writes "__metadata__" from a Rust HashMap, in an order that changes with
    every save (safetensors issue #584; upstream PR #790 sorts it the same way), so the same
    model gave a different file each time. Only the header changes: the tensor data and its
    offsets, which count from the header's end, stay as safetensors wrote them."""
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def export_quantized(qmodel, path, metadata):
    """Write `qmodel` (quantized and calibrated) to `path` as safetensors, atomically; return
    the file size in bytes. `metadata` (strings and plain Python numbers, not numpy scalars)
    must name arch, num_classes, width_multiplier and in_channels, which load_quantized needs
    to rebuild the network (a checkpoint's metadata does); pass the run's method, dataset,
    input_size and checkpoint_sha256 too. It is stored as given, numbers as JSON text."""
    missing = [k for k in REBUILD_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"export metadata lacks {', '.join(missing)}")
    clash = sorted(RESERVED & set(metadata))
    if clash:
        raise ValueError(f"export metadata may not name {', '.join(clash)}")
    rows, tensors = _layer_tensors(qmodel)
    tensors["batchnorm"], bn_table = _batchnorm_tensor(qmodel)
    tensors["fp32"], fp32_table = _fp32_tensor(qmodel)
    clamps = clamp_table(qmodel)
    grids = output_grid_table(qmodel)
    data = _sorted_metadata(safetensors.numpy.save(tensors, {
        "format": FORMAT,
        **{k: _text(k, v) for k, v in metadata.items()},
        "weight_granularity": _weight_granularity(qmodel),
        "layer_columns": ",".join(LAYER_COLUMNS),
        "layers": _json(rows),
        "batchnorm": _json(bn_table),
        "fp32": _json(fp32_table),
        **({"clamps": _json(clamps)} if clamps else {}),
        **({"output_grids": _json(grids)} if grids else {}),
    }))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(data))
    return os.path.getsize(path)


# ---------------------------------------------------------------------------- load

def read_quantized(path):
    """(metadata: str -> str, {name: numpy array}) of an exported file, read with safetensors
    alone; a missing, corrupt, truncated or foreign file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"quantized model {path} does not exist; export one first.")
    try:
        with safetensors.safe_open(path, "np") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except safetensors.SafetensorError as e:
        raise UserError(f"{path} is not a safetensors file or it is truncated ({e}); export "
                        f"it again.") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is a safetensors file but not a mobilenet-compression "
                        f"quantized model ({FORMAT}); export it again.")
    return metadata, tensors


def _build(path, metadata):
    """The FP32 network the metadata names (arch, classes, width, input channels)."""
    try:
        return build_model(**{k: cast(metadata[k]) for k, cast in REBUILD_KEYS.items()})
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} names no network this version can build; export it "
                        f"again.") from None


def _table(metadata, key):
    """One of the JSON tables in the metadata."""
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ValueError(f"its {key} table is not JSON") from None


def _part(tensors, key, start, count, name):
    """tensors[key][start:start + count]: a layer's share of a grouped tensor."""
    part = tensors[key][start:start + count]
    if start < 0 or len(part) != count:
        raise ValueError(f"{name}'s part of {key} lies outside it")
    return part


def _load_layers(qmodel, state, layers, tensors):
    """Each quantized layer's weight (q * scale) and scales into `state`, its activation
    grid into its quantizer."""
    modules = dict(quant_layers(qmodel))
    if [e["name"] for e in layers] != list(modules):
        raise ValueError("its layers table names other layers")
    used = dict.fromkeys(("weights_packed", "weight_scales", "activation_scales"), 0)
    for e in layers:
        name, layer = e["name"], modules[e["name"]]
        if layer.weight_quant.enabled:
            b, shape = e["weight_bits"], e["weight_shape"]
            if shape != list(layer.weight.shape):
                raise ValueError(f"{name}'s weight is {shape}, the network's "
                                 f"{list(layer.weight.shape)}")
            n, count = math.prod(shape), layer.weight_quant.scale.numel()
            chunk = _part(tensors, "weights_packed", e["packed_offset"], packed_nbytes(n, b),
                          name)
            q = torch.from_numpy(unpack_bits(chunk, b, n).astype(np.int16) - 2 ** (b - 1))
            scale = torch.from_numpy(_part(tensors, "weight_scales", e["weight_scale_offset"],
                                           count, name).copy())
            # q * scale in float32 is what the fake-quantize op returns for q.
            state[f"{name}.weight"] = (q.reshape(shape).float()
                                       * scale.reshape([-1] + [1] * (len(shape) - 1)))
            state[f"{name}.weight_quant.scale"] = scale
            used["weights_packed"] += len(chunk)
            used["weight_scales"] += count
        if layer.input_quant.enabled:
            (scale,) = _part(tensors, "activation_scales", e["activation_scale_index"], 1, name)
            layer.input_quant.set_qparams(scale=float(scale), signed=e["activation_signed"])
            state[f"{name}.input_quant.scale"] = layer.input_quant.scale
            used["activation_scales"] += 1
    # each layer's part is checked above; together they must be the whole tensor, which a
    # bit width edited in the table would break
    for key, count in used.items():
        if count != len(tensors[key]):
            raise ValueError(f"its layers table accounts for {count} of {key}'s "
                             f"{len(tensors[key])} values")


def _load_batchnorm(qmodel, state, table, batchnorm):
    if [row[0] for row in table] != [n for n, _ in _batchnorms(qmodel)]:
        raise ValueError("its BatchNorm table names other modules")
    for name, start, channels in table:
        for i, p in enumerate(BN_ROWS):
            state[f"{name}.{p}"] = torch.from_numpy(batchnorm[i, start:start + channels].copy())


def _load_fp32(qmodel, state, table, flat):
    if {row[0] for row in table} != set(_fp32_tensors(qmodel)):
        raise ValueError("its fp32 table names other tensors")
    for name, offset, shape in table:
        state[name] = torch.from_numpy(flat[offset:offset + math.prod(shape)].copy()).reshape(shape)


def load_quantized(path):
    """Rebuild the quantized model stored in `path` from the file alone (eval mode,
    contiguous memory format). Its logits equal those of the model that was exported."""
    metadata, tensors = read_quantized(path)
    model = _build(path, metadata)
    try:
        if "clamps" in metadata:
            restore_clamps(model, _table(metadata, "clamps"))
        layers = [dict(zip(LAYER_COLUMNS, row)) for row in _table(metadata, "layers")]
        qmodel = quantize_model(model, {e["name"]: (e["weight_bits"], e["activation_bits"])
                                        for e in layers},
                                weight_granularity=metadata["weight_granularity"])
        fp32_table = _table(metadata, "fp32")
        for name, layer in quant_layers(qmodel):  # biases added by bias correction
            if any(row[0] == f"{name}.bias" for row in fp32_table):
                layer.add_bias()
        state = qmodel.state_dict()
        _load_layers(qmodel, state, layers, tensors)
        _load_batchnorm(qmodel, state, _table(metadata, "batchnorm"), tensors["batchnorm"])
        _load_fp32(qmodel, state, fp32_table, tensors["fp32"])
        qmodel.load_state_dict(state, strict=True)
        if "output_grids" in metadata:
            restore_output_grids(qmodel, _table(metadata, "output_grids"))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, UserError) as e:
        # a file edited by hand or from another network: say which part does not fit
        what = f"missing {e.args[0]!r}" if isinstance(e, KeyError) else str(e).strip().splitlines()[-1]
        raise UserError(f"{path} does not hold the network its metadata names "
                        f"({what.strip().rstrip('.')}); export it again.") from None
    return qmodel.eval()
