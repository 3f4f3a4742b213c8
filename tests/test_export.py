"""The exported file: bit-packed weights, exact round trip, sizes counted independently."""

import json
import math
import os
import struct

import numpy as np
import pytest
import torch

from mobilenet_compression.data import BatchLoader
from mobilenet_compression.errors import UserError
from mobilenet_compression.evaluation import eval_loader, evaluate, predict
from mobilenet_compression.export import (
    activation_compression_ratio,
    activation_elements,
    compressed_mb,
    compression_metrics,
    compression_ratio,
    export_quantized,
    load_quantized,
    orig_mb,
    pack_bits,
    read_quantized,
    unpack_bits,
    weight_compression_ratio,
)
from mobilenet_compression.quantization import (
    calibrate,
    quant_layers,
    quantize_model,
    quantized_layer_names,
)

N_EVAL = 1000
METADATA = {"arch": "cifar", "dataset": "fashion-mnist", "num_classes": 10,
            "in_channels": 1, "input_size": 28, "width_multiplier": 0.25, "seed": 0}


def quantized(model, fashion_mnist, plan, **kw):
    info, train, _, _ = fashion_mnist
    qmodel = quantize_model(model, plan, **kw)
    return calibrate(qmodel, BatchLoader(train, info, 256), num_batches=2)


def mixed_plan(model):
    """Every bit width once, some layers left FP32 (weights, activations or both)."""
    plan = {}
    for i, name in enumerate(quantized_layer_names(model)):
        plan[name] = [(2, 8), (3, 4), (4, 8), (5, 6), (6, 32), (7, 3), (8, 8), (32, 8),
                      (16, 2), (32, 32)][i % 10]
    return plan


# ---------------------------------------------------------------------------- bit packing

def test_pack_bits_is_a_little_endian_bit_stream():
    # codes 1, 2, 3, 0 at 2 bits, LSB first: 01 10 11 00 -> 0b00111001
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # 3-bit codes cross byte boundaries: 5 (101), 6 (011 LSB first), 7 -> bits 101 011 11|1
    assert pack_bits(np.array([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]
    rng = np.random.default_rng(0)
    for bits in range(2, 9):
        for n in (1, 7, 8, 1001):
            codes = rng.integers(0, 2**bits, n)
            packed = pack_bits(codes, bits)
            assert packed.dtype == np.uint8 and len(packed) == math.ceil(n * bits / 8)
            assert np.array_equal(unpack_bits(packed, bits, n), codes)
    with pytest.raises(ValueError):
        pack_bits(np.array([4]), 2)


# ---------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("case", ["W4A8", "W2A4-per-tensor", "mixed"])
def test_round_trip_gives_the_same_logits_and_accuracy(fashion_mnist_model, fashion_mnist,
                                                       tmp_path, case):
    info, _, _, test = fashion_mnist
    if case == "W4A8":
        qmodel = quantized(fashion_mnist_model, fashion_mnist, (4, 8), weight_method="mse")
    elif case == "W2A4-per-tensor":
        qmodel = quantized(fashion_mnist_model, fashion_mnist, (2, 4),
                           weight_granularity="per_tensor")
    else:
        qmodel = quantized(fashion_mnist_model, fashion_mnist, mixed_plan(fashion_mnist_model))
    path = tmp_path / "model.mbq"
    size = export_quantized(qmodel, path, METADATA)
    assert size == os.path.getsize(path)
    loaded = load_quantized(path)
    assert read_quantized(path)[0]["metadata"] == METADATA

    loader = eval_loader(test.head(N_EVAL), info)
    logits, labels = predict(qmodel, loader)
    logits2, _ = predict(loaded, loader)
    assert torch.equal(logits, logits2)  # bit-exact: the file holds q and the exact scales
    assert evaluate(loaded, loader) == evaluate(qmodel, loader)
    for (name, a), (name2, b) in zip(quant_layers(qmodel), quant_layers(loaded)):
        assert name == name2
        assert (a.weight_bits, a.activation_bits) == (b.weight_bits, b.activation_bits)
        assert a.input_quant.signed == b.input_quant.signed
        assert torch.equal(a.input_quant.scale, b.input_quant.scale)
        with torch.no_grad():
            assert torch.equal(a.quantized_weight(), b.quantized_weight())


# ---------------------------------------------------------------------------- size

def independent_payload_bytes(fp32_model, plan):
    """What the file must hold, counted from the FP32 model and the plan alone: b bits per
    quantized weight (packed per layer), 4 bytes per per-channel weight scale and per
    activation scale, 4 bytes per value of every other tensor inference needs (BN gamma
    included), nothing for BN's num_batches_tracked."""
    total = 0
    quantized_weights = set()
    for name in quantized_layer_names(fp32_model):
        wb, ab = plan[name]
        layer = fp32_model.get_submodule(name)
        if wb <= 8:
            total += math.ceil(layer.weight.numel() * wb / 8) + 4 * layer.weight.shape[0]
            quantized_weights.add(f"{name}.weight")
        if ab <= 8:
            total += 4
    for key, t in fp32_model.state_dict().items():
        if key not in quantized_weights and not key.endswith("num_batches_tracked"):
            total += 4 * t.numel()
    return total


def test_file_size_equals_an_independent_count(fashion_mnist_model, fashion_mnist, tmp_path):
    plan = mixed_plan(fashion_mnist_model)
    qmodel = quantized(fashion_mnist_model, fashion_mnist, plan)
    path = tmp_path / "model.mbq"
    size = export_quantized(qmodel, path, METADATA)
    with open(path, "rb") as f:
        magic, version, header_len = struct.unpack("<4sIQ", f.read(16))
        header = json.loads(f.read(header_len))
    assert magic == b"MBQ1" and version == 1
    assert header_len < 64 * 1024
    assert size == 16 + header_len + independent_payload_bytes(fashion_mnist_model, plan)
    # BatchNorm's gamma is stored as FP32, 4 bytes per channel
    stored = {t["name"]: t for t in header["tensors"]}
    gamma = stored["features.1.conv.0.1.weight"]
    assert gamma["dtype"] == "float32" and gamma["nbytes"] == 4 * gamma["shape"][0]
    # a 3-bit layer: 3 bits per weight, packed
    name = next(n for n, (wb, _) in plan.items() if wb == 3)
    packed = stored[f"{name}.weight.packed"]
    numel = fashion_mnist_model.get_submodule(name).weight.numel()
    assert packed["dtype"] == "uint8" and packed["nbytes"] == math.ceil(numel * 3 / 8)
    # layers left at 16/32 bits keep their FP32 weight and have no activation scale
    name = next(n for n, (wb, ab) in plan.items() if wb == ab == 32)
    assert stored[f"{name}.weight"]["dtype"] == "float32"
    assert f"{name}.input_quant.scale" not in stored


def test_size_metrics(fashion_mnist_model, fashion_mnist, tmp_path):
    fp32_state = fashion_mnist_model.state_dict()
    qmodel = quantized(fashion_mnist_model, fashion_mnist, (4, 8))
    path = tmp_path / "model.mbq"
    size = export_quantized(qmodel, path, METADATA)

    state_bytes = sum(t.numel() * t.element_size() for t in fp32_state.values())
    assert orig_mb(fp32_state) == state_bytes / 2**20 == orig_mb(fashion_mnist_model)
    assert compressed_mb(path) == size / 2**20
    assert compression_ratio(orig_mb(fp32_state), compressed_mb(path)) == state_bytes / size
    assert 2.0 < state_bytes / size < 8.0  # 4-bit weights, but BN and classifier stay FP32

    numel = sum(fashion_mnist_model.get_submodule(n).weight.numel()
                for n in quantized_layer_names(fashion_mnist_model))
    channels = sum(fashion_mnist_model.get_submodule(n).weight.shape[0]
                   for n in quantized_layer_names(fashion_mnist_model))
    packed = sum(math.ceil(fashion_mnist_model.get_submodule(n).weight.numel() * 4 / 8)
                 for n in quantized_layer_names(fashion_mnist_model))
    assert weight_compression_ratio(qmodel) == 4 * numel / (packed + 4 * channels)
    assert weight_compression_ratio(quantize_model(fashion_mnist_model, (32, 8))) == 1.0

    assert activation_compression_ratio(qmodel, 28, 1) == 4.0
    assert activation_compression_ratio(quantize_model(fashion_mnist_model, (8, 2)), 28, 1) == 16.0
    assert activation_compression_ratio(quantize_model(fashion_mnist_model, (8, 32)), 28, 1) == 1.0
    counts = activation_elements(qmodel, 28, 1)
    assert counts["features.1.conv.0.0"] == 8 * 28 * 28  # the stem's 8 channels at 28x28
    assert counts["features.18.0"] == 80 * 4 * 4  # the last block's output: 28 -> 14 -> 7 -> 4
    half = {n: (8, 4 if i % 2 else 32) for i, n in enumerate(quantized_layer_names(qmodel))}
    mixed = quantize_model(fashion_mnist_model, half)
    elements = activation_elements(mixed, 28, 1)
    bits = sum(c * half[n][1] for n, c in elements.items())
    assert activation_compression_ratio(mixed, 28, 1) == 32 * sum(elements.values()) / bits

    metrics = compression_metrics(qmodel, fp32_state, path, 28, 1)
    assert set(metrics) == {"orig_mb", "compressed_mb", "compression_ratio",
                            "weight_compression_ratio", "activation_compression_ratio"}
    assert metrics["compressed_mb"] == size / 2**20


# ---------------------------------------------------------------------------- robustness

def test_export_is_atomic(fashion_mnist_model, fashion_mnist, tmp_path):
    qmodel = quantized(fashion_mnist_model, fashion_mnist, (8, 8))
    path = tmp_path / "model.mbq"
    path.write_bytes(b"old")
    export_quantized(qmodel, path, METADATA)
    assert os.listdir(tmp_path) == ["model.mbq"]
    good = path.read_bytes()
    with pytest.raises(TypeError):  # not JSON-able: nothing is written
        export_quantized(qmodel, path, {**METADATA, "bad": object()})
    with pytest.raises(ValueError, match="lacks arch"):
        export_quantized(qmodel, path, {"num_classes": 10})
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["model.mbq"]
    with pytest.raises(ValueError, match="not calibrated"):
        export_quantized(quantize_model(fashion_mnist_model, (8, 8)), tmp_path / "x.mbq",
                         METADATA)


def test_bad_files_are_user_errors(fashion_mnist_model, fashion_mnist, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_quantized(tmp_path / "missing.mbq")
    (tmp_path / "junk.mbq").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(UserError, match="not a mobilenet-compression quantized model"):
        load_quantized(tmp_path / "junk.mbq")
    qmodel = quantized(fashion_mnist_model, fashion_mnist, (4, 8))
    path = tmp_path / "model.mbq"
    export_quantized(qmodel, path, METADATA)
    (tmp_path / "cut.mbq").write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_quantized(tmp_path / "cut.mbq")
